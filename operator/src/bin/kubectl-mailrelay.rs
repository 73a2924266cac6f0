//! `kubectl-mailrelay`: the kubectl plugin
//! (`kubectl mailrelay list|status|queue|message|retry|delete|quota|completion`).

fn main() -> std::process::ExitCode {
    mailrelay_operator::plugin::main()
}
