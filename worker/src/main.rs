fn main() -> std::process::ExitCode {
    clip_worker::cli::main()
}
