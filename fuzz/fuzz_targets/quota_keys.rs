#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailrelay::fuzzing::quota_keys(data));
