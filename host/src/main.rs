// jemalloc's per-thread caches serve the few allocations each statement
// still makes (the largest, the boxed statement future of ~3.6 KiB, is above
// glibc's per-thread cache): about 10 % less proxy CPU per statement, and
// memory goes back to the system after a crowd of clients leaves
// (bench/RESULTS.md, "jemalloc adopted").
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    signalbox::cli::main()
}
