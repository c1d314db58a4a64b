//! Compression and decompression of compressed clusters (qcow2.txt, "Compressed Clusters
//! Descriptor" and the header's `compression_type` field).
//!
//! A compressed cluster decompresses to exactly one cluster. The stored stream may be followed
//! by unrelated bytes (the descriptor counts whole 512-byte sectors, and "another compressed
//! cluster may map to the tail of the final sector"), so decompression stops as soon as a full
//! cluster has been produced and never requires the stream to end exactly at the buffer end.

use super::format::CompressionType;
use crate::{Error, Result};

fn corrupt(msg: String) -> Error {
    Error::Corrupt(msg)
}

/// Decompresses `input` into `out`, which must be filled completely (its length is the
/// cluster size). Anything else is [`Error::Corrupt`].
pub(crate) fn decompress(ty: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match ty {
        CompressionType::Zlib => inflate_raw(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

/// zlib compression type: a raw deflate stream without zlib header or trailer (QEMU deflates
/// with window bits -12; a decoder with the default 32 KiB window reads such streams).
fn inflate_raw(input: &[u8], out: &mut [u8]) -> Result<()> {
    use flate2::{Decompress, FlushDecompress, Status};
    let mut d = Decompress::new(false);
    loop {
        let in_pos = d.total_in() as usize;
        let out_pos = d.total_out() as usize;
        if out_pos == out.len() {
            return Ok(());
        }
        let status = d
            .decompress(
                &input[in_pos..],
                &mut out[out_pos..],
                FlushDecompress::Finish,
            )
            .map_err(|e| corrupt(format!("compressed cluster: bad deflate stream: {e}")))?;
        let produced = d.total_out() as usize;
        if produced == out.len() {
            return Ok(());
        }
        match status {
            Status::StreamEnd => {
                return Err(corrupt(format!(
                    "compressed cluster decompresses to {produced} bytes, expected {}",
                    out.len()
                )))
            }
            Status::Ok | Status::BufError => {
                if d.total_in() as usize == in_pos && produced == out_pos {
                    return Err(corrupt(
                        "compressed cluster: deflate stream truncated".to_string(),
                    ));
                }
            }
        }
    }
}

/// zstd compression type: one or more zstd frames; decode until the cluster is full.
fn unzstd(input: &[u8], out: &mut [u8]) -> Result<()> {
    use zstd::stream::raw::{DParameter, Decoder, Operation};
    let mut d = Decoder::new().map_err(|e| Error::io("cannot create a zstd decoder", e))?;
    // Bound the decoder's window (memory) by what a cluster of at most 2 MiB can need.
    d.set_parameter(DParameter::WindowLogMax(23))
        .map_err(|e| Error::io("cannot configure the zstd decoder", e))?;
    let mut in_pos = 0usize;
    let mut out_pos = 0usize;
    while out_pos < out.len() {
        let st = d
            .run_on_buffers(&input[in_pos..], &mut out[out_pos..])
            .map_err(|e| corrupt(format!("compressed cluster: bad zstd stream: {e}")))?;
        if st.bytes_read == 0 && st.bytes_written == 0 {
            return Err(corrupt(format!(
                "compressed cluster: zstd stream ends after {out_pos} of {} bytes",
                out.len()
            )));
        }
        in_pos += st.bytes_read;
        out_pos += st.bytes_written;
    }
    Ok(())
}

/// Deflate window QEMU decompresses with (window bits -12): streams we write must not refer
/// further back than this.
const QEMU_DEFLATE_WINDOW: usize = 1 << 12;

/// Compresses one whole cluster. `None` when the result would not be smaller than `limit`
/// bytes (QEMU then writes the cluster uncompressed).
pub(crate) fn compress(ty: CompressionType, input: &[u8], limit: usize) -> Result<Option<Vec<u8>>> {
    let out = match ty {
        CompressionType::Zlib => deflate_raw(input)?,
        CompressionType::Zstd => zstd::bulk::compress(input, 0)
            .map_err(|e| Error::io("cannot zstd-compress a cluster", e))?,
    };
    Ok((out.len() < limit).then_some(out))
}

/// zlib compression type: a raw deflate stream (no zlib header or trailer) whose back
/// references stay within a 4 KiB window, so that QEMU's inflate with window bits -12 reads
/// it. The deflate backend always uses a 32 KiB window, so the input is fed in 4 KiB pieces
/// separated by full flushes, each of which makes the compressor forget its dictionary: no
/// match can then reach back more than 4 KiB.
fn deflate_raw(input: &[u8]) -> Result<Vec<u8>> {
    use flate2::{Compress, Compression, FlushCompress, Status};
    let mut c = Compress::new(Compression::default(), false);
    let mut out: Vec<u8> = Vec::with_capacity(input.len() + input.len() / 64 + 1024);
    let n_chunks = input.len().div_ceil(QEMU_DEFLATE_WINDOW).max(1);
    for i in 0..n_chunks {
        let chunk = &input[(i * QEMU_DEFLATE_WINDOW).min(input.len())
            ..((i + 1) * QEMU_DEFLATE_WINDOW).min(input.len())];
        let last = i + 1 == n_chunks;
        let flush = if last {
            FlushCompress::Finish
        } else {
            FlushCompress::Full
        };
        let start_in = c.total_in();
        loop {
            let consumed = (c.total_in() - start_in) as usize;
            if out.capacity() - out.len() < 64 {
                out.reserve(QEMU_DEFLATE_WINDOW);
            }
            let status = c
                .compress_vec(&chunk[consumed..], &mut out, flush)
                .map_err(|e| Error::io("cannot deflate a cluster", std::io::Error::other(e)))?;
            let consumed = (c.total_in() - start_in) as usize;
            let room_left = out.capacity() > out.len();
            match status {
                Status::StreamEnd => break,
                _ if !last && consumed == chunk.len() && room_left => break,
                Status::BufError if room_left => {
                    return Err(Error::io(
                        "cannot deflate a cluster",
                        std::io::Error::other("the compressor made no progress"),
                    ))
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn raw_deflate_roundtrip_with_trailing_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 7) as u8).collect();
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut stream = enc.finish().unwrap();
        stream.extend_from_slice(&[0xaa; 300]);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zlib, &stream, &mut out).unwrap();
        assert_eq!(out, data);
        // Truncated stream, wrong size.
        let mut small = vec![0u8; 65536 * 2];
        assert!(decompress(
            CompressionType::Zlib,
            &stream[..stream.len() - 300],
            &mut small
        )
        .is_err());
        assert!(decompress(CompressionType::Zlib, &stream[..10], &mut out).is_err());
        assert!(decompress(CompressionType::Zlib, &[0xff; 100], &mut out).is_err());
    }

    #[test]
    fn compress_roundtrip_both_types() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for cs in [512usize, 4096, 65536, 2 << 20] {
            let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog "
                .iter()
                .copied()
                .cycle()
                .take(cs)
                .collect();
            let mut mixed = text.clone();
            rng.fill(&mut mixed[cs / 2..]);
            let mut random = vec![0u8; cs];
            rng.fill(&mut random[..]);
            for ty in [CompressionType::Zlib, CompressionType::Zstd] {
                let c = compress(ty, &text, cs).unwrap().expect("text compresses");
                assert!(c.len() < cs / 8 + 64, "{ty:?} {cs}: {}", c.len());
                let mut out = vec![0u8; cs];
                decompress(ty, &c, &mut out).unwrap();
                assert_eq!(out, text);
                let c = compress(ty, &mixed, cs)
                    .unwrap()
                    .expect("half text compresses");
                decompress(ty, &c, &mut out).unwrap();
                assert_eq!(out, mixed);
                assert!(compress(ty, &random, cs).unwrap().is_none(), "{ty:?} {cs}");
            }
        }
    }

    #[test]
    fn zstd_roundtrip_and_garbage() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 13) as u8).collect();
        let mut stream = zstd::bulk::compress(&data[..2048], 3).unwrap();
        stream.extend(zstd::bulk::compress(&data[2048..], 3).unwrap());
        stream.extend_from_slice(&[0x55; 100]);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zstd, &stream, &mut out).unwrap();
        assert_eq!(out, data);
        let mut big = vec![0u8; 8192];
        assert!(decompress(CompressionType::Zstd, &stream, &mut big).is_err());
        assert!(decompress(
            CompressionType::Zstd,
            &[0x28, 0xb5, 0x2f, 0xfd, 0xff],
            &mut out
        )
        .is_err());
        assert!(decompress(CompressionType::Zstd, &[], &mut out).is_err());
    }
}
