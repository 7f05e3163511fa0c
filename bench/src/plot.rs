//! `--plot FILE`: the scaling cases as an SVG chart, one panel per case,
//! the server's figure for each wire beside the direct baseline.

use std::path::Path;

use plotters::prelude::*;

use crate::{BoxError, Row, Wire};

/// Draw every row with a `scale` into `path`.
pub fn draw(path: &Path, rows: &[Row]) -> Result<(), BoxError> {
    let mut panels: Vec<&'static str> = Vec::new();
    for row in rows {
        if let Some((panel, _)) = row.scale
            && !panels.contains(&panel)
        {
            panels.push(panel);
        }
    }
    if panels.is_empty() {
        return Err(
            "--plot needs a scaling case (scale-fan-out, scale-output, scale-chunks)".into(),
        );
    }
    let height = 360 * panels.len() as u32;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE)?;
    for (area, panel) in root.split_evenly((panels.len(), 1)).iter().zip(&panels) {
        let mine: Vec<&Row> = rows
            .iter()
            .filter(|r| r.scale.is_some_and(|(p, _)| p == *panel))
            .collect();
        let unit = mine.first().map(|r| r.unit).unwrap_or("");
        let xs = mine.iter().filter_map(|r| r.scale.map(|(_, x)| x));
        let (lo, hi) = xs.fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
        let top = mine
            .iter()
            .flat_map(|r| [Some(r.server.median), r.baseline.map(|b| b.median)])
            .flatten()
            .fold(0.0f64, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{panel}: {unit}"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d((lo.max(0.5)..hi * 1.2).log_scale(), 0.0..top.max(1.0))?;
        chart.configure_mesh().x_desc(*panel).y_desc(unit).draw()?;
        let series = |wire: Option<Wire>| -> Vec<(f64, f64)> {
            let mut points: Vec<(f64, f64)> = mine
                .iter()
                .filter_map(|r| {
                    let (_, x) = r.scale?;
                    match wire {
                        Some(w) if r.wire == w => Some((x, r.server.median)),
                        Some(_) => None,
                        // The baseline: one per x (each wire's pass has one).
                        None if r.wire == Wire::Json
                            || !mine.iter().any(|o| o.wire == Wire::Json) =>
                        {
                            r.baseline.map(|b| (x, b.median))
                        }
                        None => None,
                    }
                })
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            points
        };
        for (label, points, color) in [
            ("server, JSON", series(Some(Wire::Json)), RED),
            ("server, binary frames", series(Some(Wire::Binary)), BLUE),
            ("direct (baseline)", series(None), BLACK),
        ] {
            if points.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
