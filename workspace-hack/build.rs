// A build script makes cargo resolve the `[build-dependencies]` below, which pin the features
// of what build scripts and procedural macros use.
fn main() {}
