//! Framing hot path: [`LineSplitter`] on a chunk of many small JSON-RPC
//! lines (as a busy server writes them) and on one big line arriving in
//! 64 KiB chunks (a large tool result).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mcp_broker::framing::LineSplitter;

fn small_lines(c: &mut Criterion) {
    let line = br#"{"jsonrpc":"2.0","id":12345,"result":{"content":[{"type":"text","text":"hello world"}]}}"#;
    let mut chunk = Vec::new();
    for _ in 0..1000 {
        chunk.extend_from_slice(line);
        chunk.push(b'\n');
    }
    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Bytes(chunk.len() as u64));
    g.bench_function("1000 small lines in one chunk", |b| {
        let mut out = Vec::with_capacity(1000);
        b.iter(|| {
            let mut s = LineSplitter::new(4 << 20);
            out.clear();
            s.push(&chunk, &mut out);
            assert_eq!(out.len(), 1000);
        })
    });
    g.finish();
}

fn big_line(c: &mut Criterion) {
    let mut line =
        br#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":""#.to_vec();
    line.extend_from_slice(&vec![b'x'; 4 << 20]);
    line.extend_from_slice(b"\"}]}}\n");
    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Bytes(line.len() as u64));
    g.bench_function("one 4 MiB line in 64 KiB chunks", |b| {
        b.iter_batched_ref(
            Vec::new,
            |out| {
                let mut s = LineSplitter::new(16 << 20);
                for chunk in line.chunks(64 * 1024) {
                    s.push(chunk, out);
                }
                assert_eq!(out.len(), 1);
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, small_lines, big_line);
criterion_main!(benches);
