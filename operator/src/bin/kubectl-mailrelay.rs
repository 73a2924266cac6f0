//! `kubectl-mailrelay`: the kubectl plugin (`kubectl mailrelay status|queue|message|retry|quota`).

fn main() -> std::process::ExitCode {
    mailrelay_operator::plugin::main()
}
