//! The CSI v1 messages and gRPC services, generated at build time from the
//! vendored `proto/csi/csi.proto` (spec v1.13.0; see `build.rs`). Only the
//! Identity and Node services are served; the rest is generated unused.
#![allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]

tonic::include_proto!("csi.v1");
