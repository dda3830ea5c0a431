//! Read-only inspection: `info` (headers and space), `layout` (per-block fill map, histogram,
//! what defrag would reclaim; text, SVG or PNG), `stats` (record sizes, TTLs, sets,
//! partitions) and `dump` (records with their header fields and bins).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

use peregrine_engine::clock::{Clock, SystemClock};
use peregrine_engine::format::record::RecordView;
use peregrine_engine::record::Value;
use peregrine_index::{Digest, PARTITION_COUNT};
use serde_json::{Value as Json, json};

use crate::image::{CopyAt, DeviceImage, newest_copies, progress};

/// Live bytes per (device, block), from the newest copies.
fn live_per_block(newest: &HashMap<Digest, CopyAt>) -> HashMap<(usize, u32), u64> {
    let mut live = HashMap::new();
    for c in newest.values() {
        *live.entry((c.device, c.block)).or_insert(0) += u64::from(c.extent);
    }
    live
}

/// `info`: one JSON object per namespace (several paths = one namespace's devices).
pub fn info(devices: &[DeviceImage]) -> Result<Json, String> {
    let blocks_total: u64 = devices.iter().map(|d| u64::from(d.header.block_count)).sum();
    let bar = progress(blocks_total, "scanning");
    let newest = newest_copies(devices, || bar.inc(1))?;
    bar.finish_and_clear();
    let now = SystemClock.now_void_s();
    let live = live_per_block(&newest);
    let records = newest.values().filter(|c| !c.tombstone && (c.void_time == 0 || c.void_time > now)).count();
    let expired = newest.values().filter(|c| !c.tombstone && c.void_time != 0 && c.void_time <= now).count();
    let tombstones = newest.values().filter(|c| c.tombstone).count();
    let mut out = Vec::new();
    for (d, dev) in devices.iter().enumerate() {
        let h = &dev.header;
        let used = dev.used_blocks();
        let block_bytes = u64::from(h.write_block_bytes);
        let used_live: Vec<u64> = used.iter().map(|b| live.get(&(d, b.index)).copied().unwrap_or(0)).collect();
        let in_use = used_live.iter().filter(|&&l| l > 0).count() as u64;
        let eligible = used_live.iter().filter(|&&l| l > 0 && l < block_bytes / 2).count();
        let seqs: Vec<u64> = used.iter().map(|b| b.header.sequence).collect();
        out.push(json!({
            "path": dev.path.display().to_string(),
            "format_version": h.format_version,
            "namespace": h.namespace,
            "device_index": h.device_index,
            "device_count": h.device_count,
            "device_set_id": format!("{:016x}", h.device_set_id),
            "write_block_bytes": h.write_block_bytes,
            "clean_shutdown": h.clean_shutdown,
            "device_bytes": h.device_bytes,
            "data_offset": h.data_offset,
            "blocks_total": h.block_count,
            "blocks_used": in_use,
            "blocks_free": u64::from(h.block_count) - in_use,
            "blocks_with_stale_data": used.len() as u64 - in_use,
            "blocks_defrag_eligible_at_50_pct": eligible,
            "live_bytes": used_live.iter().sum::<u64>(),
            "oldest_block_sequence": seqs.iter().min(),
            "newest_block_sequence": seqs.iter().max(),
        }));
    }
    let meta = crate::image::namespace_metadata(devices);
    let truncations = json!({
        "metadata_generation": meta.generation,
        "namespace_cutoff_ms": meta.namespace_cutoff_ms,
        "sets": meta.sets.iter().map(|(n, c)| json!({ "set": String::from_utf8_lossy(n), "cutoff_ms": c })).collect::<Vec<_>>(),
        "partitions_truncated": meta.partitions.iter().filter(|p| p.epoch > 0).count(),
        "partitions_with_values": meta.partitions.iter().filter(|p| !p.value.is_empty()).count(),
    });
    Ok(json!({
        "records": records,
        "expired_records": expired,
        "tombstones": tombstones,
        "metadata": truncations,
        "devices": out,
    }))
}

/// Human form of `info`.
pub fn info_text(v: &Json) -> String {
    let mut s = String::new();
    for d in v["devices"].as_array().into_iter().flatten() {
        let _ = writeln!(s, "device {}", d["path"].as_str().unwrap_or("?"));
        let _ = writeln!(
            s,
            "  format {}, namespace {}, device {} of {}, device set {}, write block {} bytes, clean shutdown: {}",
            d["format_version"],
            d["namespace"],
            d["device_index"],
            d["device_count"],
            d["device_set_id"],
            d["write_block_bytes"],
            d["clean_shutdown"]
        );
        let _ = writeln!(
            s,
            "  {} bytes, {} blocks: {} used, {} free ({} hold only stale data), {} below 50 % (defrag candidates)",
            d["device_bytes"],
            d["blocks_total"],
            d["blocks_used"],
            d["blocks_free"],
            d["blocks_with_stale_data"],
            d["blocks_defrag_eligible_at_50_pct"]
        );
        let _ = writeln!(
            s,
            "  live bytes {}, block sequences {} .. {}",
            d["live_bytes"], d["oldest_block_sequence"], d["newest_block_sequence"]
        );
    }
    let _ =
        writeln!(s, "records {} (plus {} expired, {} tombstones)", v["records"], v["expired_records"], v["tombstones"]);
    let m = &v["metadata"];
    let _ = writeln!(
        s,
        "metadata generation {}: namespace truncated up to {} ms, {} set truncations, {} partitions truncated, {} partitions with values",
        m["metadata_generation"],
        m["namespace_cutoff_ms"],
        m["sets"].as_array().map_or(0, Vec::len),
        m["partitions_truncated"],
        m["partitions_with_values"]
    );
    s
}

/// Per-block fill of one device: (block, live bytes), every block.
pub fn fills(dev: &DeviceImage, device: usize, live: &HashMap<(usize, u32), u64>) -> Vec<(u32, u64)> {
    (0..dev.header.block_count).map(|b| (b, live.get(&(device, b)).copied().unwrap_or(0))).collect()
}

/// What `layout` found on one device.
pub struct Layout {
    /// The report for people.
    pub text: String,
    /// The same as JSON.
    pub json: Json,
    /// (block, live bytes) of every block.
    pub fills: Vec<(u32, u64)>,
}

/// `layout` of one device.
pub fn layout(dev: &DeviceImage, lwm_pct: u32) -> Result<Layout, String> {
    let bar = progress(u64::from(dev.header.block_count), "scanning");
    let newest = newest_copies(std::slice::from_ref(dev), || bar.inc(1))?;
    bar.finish_and_clear();
    let live = live_per_block(&newest);
    let fills = fills(dev, 0, &live);
    let block = u64::from(dev.header.write_block_bytes);
    let mut text = format!(
        "{} — {} blocks of {} bytes; each character is one block: ' ' free, then .:-=+*#%@ by fill (10 % steps)\n",
        dev.path.display(),
        fills.len(),
        block
    );
    const LEVELS: &[u8] = b".:-=+*#%@@";
    for row in fills.chunks(64) {
        let line: String = row
            .iter()
            .map(|&(_, l)| if l == 0 { ' ' } else { char::from(LEVELS[((l * 10 / block) as usize).min(9)]) })
            .collect();
        let _ = writeln!(text, "|{line}|");
    }
    let mut histogram = [0u64; 11];
    for &(_, l) in &fills {
        let bucket = if l == 0 { 0 } else { 1 + ((l * 10 / block) as usize).min(9) };
        histogram[bucket] += 1;
    }
    let _ = writeln!(text, "fill histogram (blocks):");
    let labels =
        ["free", "0-10%", "10-20%", "20-30%", "30-40%", "40-50%", "50-60%", "60-70%", "70-80%", "80-90%", "90-100%"];
    let max = histogram.iter().copied().max().unwrap_or(1).max(1);
    for (label, n) in labels.iter().zip(histogram) {
        let _ = writeln!(text, "  {label:>8} {n:>6} {}", "#".repeat((n * 50 / max) as usize));
    }
    let lwm = block * u64::from(lwm_pct) / 100;
    let candidates: Vec<&(u32, u64)> = fills.iter().filter(|(_, l)| *l > 0 && *l < lwm).collect();
    let reclaim: u64 = candidates.iter().map(|(_, l)| block - l).sum();
    let moved: u64 = candidates.iter().map(|(_, l)| l).sum();
    let _ = writeln!(
        text,
        "defrag at {lwm_pct} %: {} blocks, reclaims {reclaim} bytes by rewriting {moved} live bytes",
        candidates.len()
    );
    let json = json!({
        "path": dev.path.display().to_string(),
        "block_bytes": block,
        "blocks": fills.len(),
        "fill_histogram": labels.iter().zip(histogram).map(|(l, n)| json!({"range": l, "blocks": n})).collect::<Vec<_>>(),
        "defrag_lwm_pct": lwm_pct,
        "defrag_candidate_blocks": candidates.len(),
        "defrag_reclaim_bytes": reclaim,
        "defrag_rewrite_bytes": moved,
    });
    Ok(Layout { text, json, fills })
}

fn fill_color(fill: f64, free: bool) -> (u8, u8, u8) {
    if free {
        return (235, 235, 235);
    }
    // Pale yellow (nearly empty) to dark red (full).
    let t = fill.clamp(0.0, 1.0);
    (255 - (t * 90.0) as u8, (230.0 * (1.0 - t)) as u8 + 10, (120.0 * (1.0 - t)) as u8)
}

const CELL: usize = 12;
const PER_ROW: usize = 64;

/// An SVG picture of the block fills.
pub fn layout_svg(title: &str, fills: &[(u32, u64)], block_bytes: u64) -> String {
    let rows = fills.len().div_ceil(PER_ROW);
    let (w, h) = (PER_ROW * CELL + 20, rows * CELL + 60);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="20">{}</text>"#,
        title.replace('<', "&lt;")
    );
    for (i, &(block, live)) in fills.iter().enumerate() {
        let (r, g, b) = fill_color(live as f64 / block_bytes as f64, live == 0);
        let (x, y) = (10 + (i % PER_ROW) * CELL, 35 + (i / PER_ROW) * CELL);
        let _ = write!(
            s,
            r#"<rect x="{x}" y="{y}" width="{}" height="{}" fill="rgb({r},{g},{b})"><title>block {block}: {:.0} %</title></rect>"#,
            CELL - 1,
            CELL - 1,
            live as f64 * 100.0 / block_bytes as f64
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The same picture as a PNG.
pub fn layout_png(fills: &[(u32, u64)], block_bytes: u64) -> Vec<u8> {
    let rows = fills.len().div_ceil(PER_ROW).max(1);
    let (w, h) = (PER_ROW * CELL, rows * CELL);
    let mut raw = Vec::with_capacity((w * 3 + 1) * h);
    for y in 0..h {
        raw.push(0); // filter: none
        for x in 0..w {
            let i = (y / CELL) * PER_ROW + x / CELL;
            let edge = x % CELL == CELL - 1 || y % CELL == CELL - 1;
            let (r, g, b) = match fills.get(i) {
                Some(&(_, live)) if !edge => fill_color(live as f64 / block_bytes as f64, live == 0),
                _ => (255, 255, 255),
            };
            raw.extend_from_slice(&[r, g, b]);
        }
    }
    crate::png::encode_rgb(w as u32, h as u32, &raw)
}

/// `stats`: record sizes, TTLs, sets and partitions of the newest live copies.
pub fn stats(devices: &[DeviceImage]) -> Result<Json, String> {
    let blocks_total: u64 = devices.iter().map(|d| u64::from(d.header.block_count)).sum();
    let bar = progress(2 * blocks_total, "scanning");
    let newest = newest_copies(devices, || bar.inc(1))?;
    let now = SystemClock.now_void_s();
    let mut sizes: BTreeMap<u32, u64> = BTreeMap::new();
    let mut ttls: BTreeMap<&str, u64> = BTreeMap::new();
    let mut sets: BTreeMap<String, u64> = BTreeMap::new();
    let mut partitions = vec![0u64; PARTITION_COUNT];
    for (d, dev) in devices.iter().enumerate() {
        for info in dev.used_blocks() {
            dev.scan(&info, |offset, v| {
                let here = newest
                    .get(&v.digest())
                    .is_some_and(|c| c.device == d && c.block == info.index && c.offset == offset);
                let m = v.meta();
                if !here || v.is_tombstone() || (m.void_time != 0 && m.void_time <= now) {
                    return;
                }
                *sizes.entry((v.len() as u32).next_power_of_two()).or_insert(0) += 1;
                let left = m.void_time.saturating_sub(now);
                let bucket = match (m.void_time, left) {
                    (0, _) => "never",
                    (_, 0..3600) => "< 1 hour",
                    (_, 3600..86_400) => "< 1 day",
                    (_, 86_400..604_800) => "< 1 week",
                    (_, 604_800..2_592_000) => "< 30 days",
                    (_, 2_592_000..31_536_000) => "< 1 year",
                    _ => ">= 1 year",
                };
                *ttls.entry(bucket).or_insert(0) += 1;
                *sets.entry(String::from_utf8_lossy(v.set_name()).into_owned()).or_insert(0) += 1;
                partitions[v.digest().partition().index()] += 1;
            })?;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let total: u64 = partitions.iter().sum();
    Ok(json!({
        "records": total,
        "record_size_bytes_up_to": sizes.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "ttl_remaining": ttls.iter().map(|(k, v)| ((*k).to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "sets": sets.iter().map(|(k, v)| (if k.is_empty() { "(no set)".to_string() } else { k.clone() }, json!(v))).collect::<serde_json::Map<_, _>>(),
        "partition_min": partitions.iter().min(),
        "partition_max": partitions.iter().max(),
        "partition_mean": total as f64 / PARTITION_COUNT as f64,
        "partitions": partitions,
    }))
}

/// Human form of `stats`.
pub fn stats_text(v: &Json) -> String {
    let mut s = format!("records {}\n", v["records"]);
    for (title, key) in [
        ("record sizes (bytes, up to)", "record_size_bytes_up_to"),
        ("time to expiry", "ttl_remaining"),
        ("records per set", "sets"),
    ] {
        let _ = writeln!(s, "{title}:");
        for (k, n) in v[key].as_object().into_iter().flatten() {
            let _ = writeln!(s, "  {k:>12} {n}");
        }
    }
    let _ = writeln!(
        s,
        "records per partition: min {} mean {:.1} max {} (--json lists all 4096)",
        v["partition_min"],
        v["partition_mean"].as_f64().unwrap_or(0.0),
        v["partition_max"]
    );
    s
}

/// A record as JSON for `dump`.
pub fn record_json(
    v: &RecordView<'_>,
    device: &str,
    block: u32,
    offset: u32,
    sequence: u64,
    newest: Option<bool>,
) -> Json {
    let m = v.meta();
    let bins: serde_json::Map<String, Json> = v
        .raw_bins()
        .map(|(name, pt, bytes)| {
            let shown = match Value::decode(pt, bytes) {
                Some(Value::Int(i)) => json!(i),
                Some(Value::Float(f)) => json!(f),
                Some(Value::Bool(b)) => json!(b),
                Some(Value::String(s)) => json!(String::from_utf8_lossy(&s)),
                _ => json!({"particle_type": pt, "hex": hex(bytes)}),
            };
            (String::from_utf8_lossy(name).into_owned(), shown)
        })
        .collect();
    let mut j = json!({
        "device": device,
        "block": block,
        "offset": offset,
        "block_sequence": sequence,
        "digest": v.digest().to_hex(),
        "partition": v.digest().partition().get(),
        "set": String::from_utf8_lossy(v.set_name()),
        "generation": m.generation,
        "last_update_ms": m.last_update_ms,
        "void_time": m.void_time,
        "tombstone": v.is_tombstone(),
        "length": v.len(),
        "bins": bins,
    });
    if let Some((pt, key)) = v.key() {
        j["key"] = json!({"particle_type": pt, "hex": hex(key)});
    }
    if let Some(n) = newest {
        j["newest"] = json!(n);
    }
    j
}

fn hex(b: &[u8]) -> String {
    let shown: String = b.iter().take(64).map(|x| format!("{x:02x}")).collect();
    if b.len() > 64 { format!("{shown}... ({} bytes)", b.len()) } else { shown }
}

/// Human form of a dumped record.
pub fn record_text(j: &Json) -> String {
    let mut s = format!(
        "{} block {} offset {} (sequence {}){}\n  digest {} partition {} set {:?} generation {} last_update_ms {} void_time {}{}\n",
        j["device"].as_str().unwrap_or("?"),
        j["block"],
        j["offset"],
        j["block_sequence"],
        match j.get("newest").and_then(Json::as_bool) {
            Some(true) => " [newest]",
            Some(false) => " [older copy]",
            None => "",
        },
        j["digest"].as_str().unwrap_or("?"),
        j["partition"],
        j["set"].as_str().unwrap_or(""),
        j["generation"],
        j["last_update_ms"],
        j["void_time"],
        if j["tombstone"].as_bool() == Some(true) { " TOMBSTONE" } else { "" }
    );
    for (name, value) in j["bins"].as_object().into_iter().flatten() {
        let _ = writeln!(s, "  {name} = {value}");
    }
    s
}
