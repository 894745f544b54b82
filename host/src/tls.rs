//! TLS: certificates for a test cluster (`tls init`, `tls issue`) and the
//! rustls configurations for the server and its clients.
