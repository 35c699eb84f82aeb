//! Features only: see this package's Cargo.toml.
