//! `verify`: decode every used block and every record, check checksums and structure, and
//! report each damaged record (block, offset, and the digest its header still names) and each
//! torn block (damage running up to the block's recorded fill). Read-only.

use peregrine_engine::format::record::{self, damaged_header};
use serde_json::{Value as Json, json};

use crate::image::{DeviceImage, progress};

/// One damaged record or region.
#[derive(Debug, Clone)]
pub struct Damage {
    /// Device path.
    pub device: String,
    /// Block index.
    pub block: u32,
    /// Block-relative offset of the damage.
    pub offset: u32,
    /// Bytes affected.
    pub len: u32,
    /// The digest the record header names, if the header is readable.
    pub digest: Option<String>,
    /// The damage runs up to the block's recorded fill (a torn write).
    pub torn: bool,
}

/// Verifies every device; returns the JSON report (`ok` false when anything is wrong).
pub fn verify(devices: &[DeviceImage]) -> Result<Json, String> {
    let blocks_total: u64 = devices.iter().map(|d| u64::from(d.header.block_count)).sum();
    let bar = progress(blocks_total, "verifying");
    let mut records_checked = 0u64;
    let mut blocks_checked = 0u64;
    let mut damage: Vec<Damage> = Vec::new();
    let mut torn_blocks = 0u64;
    for dev in devices {
        let used = dev.used_blocks();
        bar.inc(u64::from(dev.header.block_count) - used.len() as u64);
        for info in used {
            let (scan, bytes) = dev.scan(&info, |_, _| {})?;
            records_checked += scan.records;
            blocks_checked += 1;
            let fill = (info.header.fill_end as usize).max(64).min(bytes.len()) as u32;
            let mut block_torn = false;
            for (start, end) in scan.damaged {
                let torn = end >= fill;
                block_torn |= torn;
                // Name every damaged record the region holds whose header is still readable.
                let mut pos = start as usize;
                let mut named = 0;
                while pos < end as usize {
                    match damaged_header(&bytes[pos..]) {
                        Some(h)
                            if h.length as usize >= record::HEADER_BYTES && pos + h.length as usize <= bytes.len() =>
                        {
                            damage.push(Damage {
                                device: dev.path.display().to_string(),
                                block: info.index,
                                offset: pos as u32,
                                len: h.length,
                                digest: Some(h.digest.to_hex()),
                                torn,
                            });
                            named += 1;
                            pos += record::extent(h.length as usize);
                        }
                        _ => pos += 16,
                    }
                }
                if named == 0 {
                    damage.push(Damage {
                        device: dev.path.display().to_string(),
                        block: info.index,
                        offset: start,
                        len: end - start,
                        digest: None,
                        torn,
                    });
                }
            }
            torn_blocks += u64::from(block_torn);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let corrupt = damage.len() as u64;
    Ok(json!({
        "ok": corrupt == 0,
        "blocks_checked": blocks_checked,
        "records_checked": records_checked,
        "corrupt_records": corrupt,
        "torn_blocks": torn_blocks,
        "damage": damage.iter().map(|d| json!({
            "device": d.device, "block": d.block, "offset": d.offset, "len": d.len, "digest": d.digest, "torn": d.torn,
        })).collect::<Vec<_>>(),
    }))
}

/// Human form.
pub fn verify_text(v: &Json) -> String {
    let mut s = String::new();
    for d in v["damage"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "{} {} block {} offset {} ({} bytes){}\n",
            if d["torn"].as_bool() == Some(true) { "TORN" } else { "CORRUPT" },
            d["device"].as_str().unwrap_or("?"),
            d["block"],
            d["offset"],
            d["len"],
            d["digest"].as_str().map(|x| format!(" digest {x}")).unwrap_or_default()
        ));
    }
    s.push_str(&format!(
        "{} blocks, {} records verified; {} damaged records, {} torn blocks: {}\n",
        v["blocks_checked"],
        v["records_checked"],
        v["corrupt_records"],
        v["torn_blocks"],
        if v["ok"].as_bool() == Some(true) { "OK" } else { "DAMAGED" }
    ));
    s
}
