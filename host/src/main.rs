fn main() -> std::process::ExitCode {
    signalbox::cli::main()
}
