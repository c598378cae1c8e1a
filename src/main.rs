fn main() -> std::process::ExitCode {
    wrenn::cli::main()
}
