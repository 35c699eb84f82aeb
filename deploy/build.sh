#!/usr/bin/env bash
# Builds what the container image ships: the release host binary and the bundled plugins.
# The Dockerfile runs exactly this, and so does `cargo xtask test` (which then checks the
# result), so the image's build steps are tested even where no Docker engine runs.
#
#   deploy/build.sh OUT_DIR    ->  OUT_DIR/bin/wasm-extproc, OUT_DIR/plugins/*.wasm
#
# PROFILE picks the host's cargo profile: `dist` (the default, what the image ships: release
# with thin LTO) or `release` (what `cargo xtask test` and the demo build, sharing the tests'
# compiled dependencies).
set -euo pipefail
out=${1:?usage: deploy/build.sh OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
profile=${PROFILE:-dist}

# The bundled plugins need no WASI: plugins/.cargo/config.toml builds them for this target.
wasm=wasm32-unknown-unknown
if ! rustup target list --installed | grep -qx $wasm; then
    rustup target add $wasm
fi
cargo build --locked --profile "$profile" --package wasm-extproc \
    --manifest-path "$root/Cargo.toml" --target-dir "$target"
(cd "$root/plugins" && cargo build --locked --release --target $wasm --target-dir "$target")

mkdir -p "$out/bin" "$out/plugins"
install -m 0755 "$target/$profile/wasm-extproc" "$out/bin/wasm-extproc"
# The default chain: the ASM demo plugin. The other bundled plugins ship beside it, unused
# until copied into a plugins directory.
install -m 0644 "$target/$wasm/release/asm_demo.wasm" "$out/plugins/10-asm-demo.wasm"
mkdir -p "$out/examples"
for plugin in bearer_auth json_redact; do
    install -m 0644 "$target/$wasm/release/$plugin.wasm" "$out/examples/$plugin.wasm"
done
