fn main() -> std::process::ExitCode {
    dlsm::cli::main()
}
