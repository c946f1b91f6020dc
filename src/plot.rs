//! PNG plots with plotters: line charts and heatmaps (the report's figures and TensorBoard's
//! labelled images).
//!
//! Text is drawn with plotters' pure-Rust `ab_glyph` renderer, which needs a TrueType font:
//! `$CODESPOT_FONT`, else DejaVu Sans (Debian `fonts-dejavu-core`, installed by
//! scripts/setup.sh when missing), else the first `.ttf` under /usr/share/fonts.

use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

static FONT: OnceLock<std::result::Result<(), String>> = OnceLock::new();

fn font_path() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("CODESPOT_FONT") {
        return Some(p.into());
    }
    let dejavu = Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf");
    if dejavu.is_file() {
        return Some(dejavu.into());
    }
    glob::glob("/usr/share/fonts/**/*.ttf").ok()?.flatten().next()
}

/// Register the font once (plotters keeps a `'static` reference to its bytes).
pub(crate) fn ensure_font() -> Result<()> {
    FONT.get_or_init(|| {
        let p = font_path().ok_or("no TrueType font found: set CODESPOT_FONT or install fonts-dejavu-core")?;
        let bytes = std::fs::read(&p).map_err(|e| format!("reading font {}: {e}", p.display()))?;
        let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, leaked)
            .map_err(|_| format!("{}: not a usable TrueType font", p.display()))?;
        Ok(())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn err<E: std::fmt::Debug>(path: &Path) -> impl FnOnce(E) -> anyhow::Error + '_ {
    move |e| anyhow!("drawing {}: {e:?}", path.display())
}

/// A line series: name, points, dashed, and vertical interval bars `(x, low, high)`.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
    pub bars: Vec<(f64, f64, f64)>,
}

impl Series {
    /// The same series with x replaced by log10 x (points with x ≤ 0 dropped).
    pub(crate) fn log_x(self) -> Self {
        Self {
            points: self
                .points
                .into_iter()
                .filter(|p| p.0 > 0.0)
                .map(|(x, y)| (x.log10(), y))
                .collect(),
            bars: self
                .bars
                .into_iter()
                .filter(|b| b.0 > 0.0)
                .map(|(x, l, h)| (x.log10(), l, h))
                .collect(),
            ..self
        }
    }
}

const PALETTE: [RGBColor; 12] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 0),
    RGBColor(255, 187, 120),
];

/// A line chart of `series` (colours by position; dashed series get points only).
pub fn lines(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<()> {
    ensure_font()?;
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| {
            let bars = s.bars.iter().flat_map(|&(x, l, h)| [(x, l), (x, h)]);
            s.points.iter().copied().chain(bars)
        })
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    if pts.is_empty() {
        bail!("{}: nothing to plot", path.display());
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in &pts {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.08).max(1e-6);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err(path))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err(path))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err(path))?;
    for (i, s) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let p: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .collect();
        let style = if s.dashed {
            c.mix(0.55).stroke_width(2)
        } else {
            c.stroke_width(2)
        };
        let anno = if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(p.clone(), 6, 4, style))
                .map_err(err(path))?
        } else {
            chart
                .draw_series(LineSeries::new(p.clone(), style))
                .map_err(err(path))?
        };
        anno.label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart
            .draw_series(p.iter().map(|&(x, y)| Circle::new((x, y), 3, c.filled())))
            .map_err(err(path))?;
        let bars = s
            .bars
            .iter()
            .filter(|b| b.0.is_finite() && b.1.is_finite() && b.2.is_finite());
        chart
            .draw_series(bars.map(|&(x, l, h)| PathElement::new(vec![(x, l), (x, h)], c.mix(0.6).stroke_width(1))))
            .map_err(err(path))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err(path))?;
    root.present().map_err(err(path))?;
    Ok(())
}

/// A heatmap: rows = layers (L0 at the top), columns named by `cols`; colour scale over
/// `range` (default: 0 to the grid's maximum).
pub fn heatmap(path: &Path, title: &str, grid: &[Vec<f64>], cols: &[String], range: Option<(f64, f64)>) -> Result<()> {
    ensure_font()?;
    let rows = grid.len().max(1);
    let root = BitMapBackend::new(path, (640, (rows * 18 + 120).max(300) as u32)).into_drawing_area();
    draw_heatmap(&root, title, grid, cols, range, 560).map_err(err(path))?;
    root.present().map_err(err(path))?;
    Ok(())
}

/// [`heatmap`] into a square `size × size` RGB buffer (a TensorBoard image).
pub(crate) fn heatmap_rgb(
    title: &str,
    grid: &[Vec<f64>],
    cols: &[String],
    range: Option<(f64, f64)>,
    size: usize,
) -> Result<Vec<u8>> {
    ensure_font()?;
    let mut buf = vec![0u8; size * size * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (size as u32, size as u32)).into_drawing_area();
        let main = size as u32 * 7 / 8;
        draw_heatmap(&root, title, grid, cols, range, main).map_err(|e| anyhow!("drawing '{title}': {e:?}"))?;
        root.present().map_err(|e| anyhow!("drawing '{title}': {e:?}"))?;
    }
    Ok(buf)
}

type DrawResult<DB> = std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// A labelled grid (rows `L{n}` top down, `cols` across) with a colour bar on `[lo, hi]`
/// (default: 0 to the grid's maximum); the chart takes `main` pixels of the width.
fn draw_heatmap<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    grid: &[Vec<f64>],
    cols: &[String],
    range: Option<(f64, f64)>,
    main: u32,
) -> DrawResult<DB> {
    let rows = grid.len().max(1);
    let ncols = cols.len().max(1);
    let (lo, hi) = range.unwrap_or_else(|| (0.0, grid.iter().flatten().fold(0.0f64, |a, &b| a.max(b))));
    let span = if hi > lo { hi - lo } else { 1.0 };
    root.fill(&WHITE)?;
    let (main, bar) = root.split_horizontally(main);
    let mut chart = ChartBuilder::on(&main)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(44)
        .build_cartesian_2d(0..ncols, 0..rows)?;
    let cols_owned: Vec<String> = cols.to_vec();
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(ncols)
        .y_labels(rows.min(32))
        .x_label_formatter(&|x| cols_owned.get(*x).cloned().unwrap_or_default())
        .y_label_formatter(&|y| {
            if *y < rows {
                format!("L{}", rows - 1 - *y)
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 12))
        .draw()?;
    chart.draw_series(grid.iter().enumerate().flat_map(|(r, row)| {
        let y = rows - 1 - r;
        row.iter().enumerate().map(move |(c, v)| {
            let [red, g, b] = colour(((v - lo) / span).clamp(0.0, 1.0));
            Rectangle::new([(c, y), (c + 1, y + 1)], RGBColor(red, g, b).filled())
        })
    }))?;
    // Colour bar.
    let h = bar.dim_in_pixel().1 as i32;
    for i in 0..100 {
        let t = i as f64 / 99.0;
        let [r, g, b] = colour(t);
        let y0 = h - 60 - (i * (h - 120) / 100);
        bar.draw(&Rectangle::new(
            [(20, y0 - (h - 120) / 100 - 1), (40, y0)],
            RGBColor(r, g, b).filled(),
        ))?;
    }
    let style = ("sans-serif", 12).into_font().color(&BLACK);
    bar.draw(&Text::new(format!("{hi:.3}"), (10, 40), style.clone()))?;
    bar.draw(&Text::new(format!("{lo:.3}"), (10, h - 52), style))?;
    Ok(())
}

/// A viridis-like colour for t in [0, 1].
pub(crate) fn colour(t: f64) -> [u8; 3] {
    const STOPS: [[f64; 3]; 5] = [
        [68.0, 1.0, 84.0],
        [59.0, 82.0, 139.0],
        [33.0, 145.0, 140.0],
        [94.0, 201.0, 98.0],
        [253.0, 231.0, 37.0],
    ];
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let x = t * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let mut c = [0u8; 3];
    for (j, cj) in c.iter_mut().enumerate() {
        *cj = (STOPS[i][j] + (STOPS[i + 1][j] - STOPS[i][j]) * f).round() as u8;
    }
    c
}
