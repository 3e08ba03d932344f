fn main() {
    shotover::runner::Shotover::new().run_block();
}
