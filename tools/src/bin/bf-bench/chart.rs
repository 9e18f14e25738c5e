//! The PNG chart of `scripts/bench`'s results: one horizontal bar of MB/s per CSV row (log scale, since the
//! rows span par2's few MB/s to the CPU stages' GB/s) and a vertical red line at the limit row's rate.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// One bar: its label, section (for the colour) and rate.
struct Bar {
    label: String,
    section: String,
    mb_per_s: f64,
}

/// Splits one CSV line into fields (RFC 4180 quoting, as Python's `csv` module writes it).
fn split_csv(line: &str) -> Vec<String> {
    let (mut fields, mut cur, mut quoted, mut chars) = (Vec::new(), String::new(), false, line.chars().peekable());
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    fields.push(cur);
    fields
}

/// Reads the bars (rows with a positive MB/s) and the limit (the row of section `limit`).
fn read(csv: &str) -> Result<(Vec<Bar>, Option<f64>)> {
    let mut lines = csv.lines().filter(|l| !l.trim().is_empty());
    let header = split_csv(lines.next().ok_or_else(|| anyhow!("empty CSV"))?);
    let col = |name: &str| header.iter().position(|h| h == name).ok_or_else(|| anyhow!("CSV has no {name} column"));
    let (section, name, size, rate) = (col("section")?, col("name")?, col("size")?, col("MB_per_s")?);
    let (mut bars, mut limit) = (Vec::new(), None);
    for line in lines {
        let f = split_csv(line);
        let get = |i: usize| f.get(i).map(String::as_str).unwrap_or("");
        let Ok(v) = get(rate).parse::<f64>() else { continue };
        if v <= 0.0 {
            continue;
        }
        if get(section) == "limit" {
            limit = Some(v);
        }
        let size = if get(size).is_empty() { String::new() } else { format!(" ({})", get(size)) };
        bars.push(Bar { label: format!("{}{size}", get(name)), section: get(section).to_string(), mb_per_s: v });
    }
    Ok((bars, limit))
}

fn colour(section: &str) -> RGBColor {
    match section {
        "ceiling" => RGBColor(66, 133, 244),
        "limit" => RGBColor(219, 68, 55),
        "files" => RGBColor(15, 157, 88),
        "nbd" => RGBColor(244, 160, 0),
        "memory" => RGBColor(150, 90, 200),
        _ => RGBColor(120, 120, 120),
    }
}

/// Draws `csv_path` into `png_path`.
pub fn draw(csv_path: &Path, png_path: &Path, font: &Path) -> Result<()> {
    let bytes =
        std::fs::read(font).with_context(|| format!("font {} (apt-get install fonts-dejavu-core)", font.display()))?;
    // plotters' ab_glyph backend keeps registered fonts for the life of the process.
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
        .map_err(|_| anyhow!("{} is not a usable TrueType font", font.display()))?;
    let text = std::fs::read_to_string(csv_path).with_context(|| format!("reading {}", csv_path.display()))?;
    let (bars, limit) = read(&text)?;
    if bars.is_empty() {
        bail!("{} has no rows with a MB/s figure", csv_path.display());
    }
    let n = bars.len();
    let max = bars.iter().map(|b| b.mb_per_s).fold(0.0, f64::max);
    let min = bars.iter().map(|b| b.mb_per_s).fold(f64::MAX, f64::min);
    let (x0, x1) = (10f64.powf(min.log10().floor()), 10f64.powf((max * 1.5).log10().ceil()));
    let height = 90 + 24 * n as u32;
    let root = BitMapBackend::new(png_path, (1400, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("BlockFrame benchmark: MB/s of user data (log scale; red line: the limit)", ("sans-serif", 22))
        .margin(12)
        .margin_right(40)
        .x_label_area_size(36)
        .y_label_area_size(400)
        .build_cartesian_2d((x0..x1).log_scale(), (0..n).into_segmented())?;
    // Row i of the CSV is drawn i-th from the top.
    let slot = |i: usize| n - 1 - i;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_style(("sans-serif", 14))
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(j) if *j < n => bars[n - 1 - j].label.clone(),
            _ => String::new(),
        })
        .x_desc("MB/s")
        .x_label_formatter(&|v| format!("{v}"))
        .x_label_style(("sans-serif", 14))
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        let (lo, hi) = (SegmentValue::Exact(slot(i)), SegmentValue::Exact(slot(i) + 1));
        let mut r = Rectangle::new([(x0, lo), (b.mb_per_s, hi)], colour(&b.section).filled());
        r.set_margin(3, 3, 0, 0);
        r
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        let label = if b.mb_per_s >= 10.0 { format!(" {:.0}", b.mb_per_s) } else { format!(" {:.2}", b.mb_per_s) };
        Text::new(label, (b.mb_per_s, SegmentValue::CenterOf(slot(i))), ("sans-serif", 13).into_font())
    }))?;
    if let Some(l) = limit {
        chart.draw_series(std::iter::once(PathElement::new(
            [(l, SegmentValue::Exact(0)), (l, SegmentValue::Exact(n))],
            colour("limit").stroke_width(2),
        )))?;
    }
    root.present().with_context(|| format!("writing {}", png_path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quoting_and_limit() {
        assert_eq!(split_csv(r#"a,"b, c",,"d""e""#), ["a", "b, c", "", "d\"e"]);
        let csv = "section,name,size,MB_per_s\nceiling,GCM,,1500\nlimit,\"slowest, RS\",,900\nmemory,rss,1 GiB,\n";
        let (bars, limit) = read(csv).unwrap();
        assert_eq!(bars.len(), 2);
        assert_eq!(bars[1].label, "slowest, RS");
        assert_eq!(limit, Some(900.0));
    }
}
