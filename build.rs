//! Generates the CSI gRPC messages and services from the vendored
//! `proto/csi/csi.proto` (feature `csi`), with protox, a protobuf compiler
//! written in Rust, so building needs no `protoc` binary.

fn main() {
    #[cfg(feature = "csi")]
    csi();
}

#[cfg(feature = "csi")]
fn csi() {
    println!("cargo:rerun-if-changed=proto/csi/csi.proto");
    let fds = match protox::compile(["csi.proto"], ["proto/csi"]) {
        Ok(f) => f,
        Err(e) => panic!("proto/csi/csi.proto: {e}"),
    };
    // Client stubs too: the tests play the kubelet.
    if let Err(e) = tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)
    {
        panic!("generating the CSI services: {e}");
    }
}
