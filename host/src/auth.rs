//! Client authentication: bearer tokens with roles (`--auth-file`).
