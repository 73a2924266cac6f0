#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailrelay_smtp::fuzzing::client_reply(data));
