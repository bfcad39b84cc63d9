//! The live view as a terminal UI (ratatui): a process table that can be sorted
//! by any column, processes expanded to their stacks, a pause, and a help line.
//! It only renders [`Report`]s the run loop hands it and turns keys into
//! [`Action`]s; it never reads the ring buffer, so a frozen screen never stops
//! the counting. The terminal is restored on quit, on error, on SIGINT/SIGTERM
//! (the loop ends, [`Tui`] drops) and on panic (ratatui's hook).

use std::{collections::HashSet, io};

use anyhow::{Context, Result};
use crossterm::event::{Event, EventStream, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use futures_util::StreamExt;
use ratatui::{
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::{Line, Span},
    widgets::Paragraph,
    DefaultTerminal, Frame,
};

use crate::{
    present::units::{group, human_bytes},
    slab::report::{GroupBy, ProcessReport, Report, SortKey},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    Pid,
    Comm,
    Outstanding,
    Bytes,
    Growth,
    AllocRate,
    Allocs,
    Frees,
}

const COLUMNS: [Column; 8] = [
    Column::Pid,
    Column::Comm,
    Column::Outstanding,
    Column::Bytes,
    Column::Growth,
    Column::AllocRate,
    Column::Allocs,
    Column::Frees,
];

impl From<SortKey> for Column {
    /// The column a `--sort` order starts the live view on; the view sorts by
    /// any of its columns from there.
    fn from(sort: SortKey) -> Column {
        match sort {
            SortKey::Outstanding => Column::Outstanding,
            SortKey::Rate => Column::AllocRate,
            SortKey::Allocs => Column::Allocs,
        }
    }
}

impl Column {
    fn title(self) -> &'static str {
        match self {
            Column::Pid => "PID",
            Column::Comm => "COMM",
            Column::Outstanding => "OUTSTANDING",
            Column::Bytes => "BYTES",
            Column::Growth => "GROWTH/s",
            Column::AllocRate => "ALLOCS/s",
            Column::Allocs => "ALLOCS",
            Column::Frees => "FREES",
        }
    }

    fn width(self) -> usize {
        match self {
            Column::Pid => 8,
            Column::Comm => 16,
            Column::Outstanding => 11,
            Column::Bytes => 10,
            Column::Growth => 9,
            Column::AllocRate | Column::Allocs | Column::Frees => 10,
        }
    }

    fn cell(self, p: &ProcessReport) -> String {
        match self {
            Column::Pid => p.tgid.to_string(),
            Column::Comm => p.comm.chars().take(16).collect(),
            Column::Outstanding => group(p.counts.outstanding),
            Column::Bytes => human_bytes(p.counts.outstanding_bytes),
            Column::Growth => format!("{:+.1}", p.growth_rate),
            Column::AllocRate => format!("{:.1}", p.alloc_rate),
            Column::Allocs => group(p.counts.allocs),
            Column::Frees => group(p.counts.frees),
        }
    }

    fn cmp(self, a: &ProcessReport, b: &ProcessReport) -> std::cmp::Ordering {
        let f = |x: f64, y: f64| x.total_cmp(&y);
        match self {
            Column::Pid => a.tgid.cmp(&b.tgid),
            Column::Comm => a.comm.cmp(&b.comm),
            Column::Outstanding => a.counts.outstanding.cmp(&b.counts.outstanding),
            Column::Bytes => a.counts.outstanding_bytes.cmp(&b.counts.outstanding_bytes),
            Column::Growth => f(a.growth_rate, b.growth_rate),
            Column::AllocRate => f(a.alloc_rate, b.alloc_rate),
            Column::Allocs => a.counts.allocs.cmp(&b.counts.allocs),
            Column::Frees => a.counts.frees.cmp(&b.counts.frees),
        }
    }
}

/// What a key asks the run loop to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    Redraw,
    Quit,
    /// Aggregate rows by the next `--group-by` (shown from the next refresh).
    Regroup,
}

/// Everything the screen shows besides the report; kept apart from the
/// terminal so it can be tested without one.
#[derive(Debug)]
pub struct ViewState {
    pub sort: Column,
    pub descending: bool,
    /// Followed by pid, so the cursor stays on a process when rows reorder.
    pub selected: Option<u32>,
    pub expanded: HashSet<u32>,
    pub paused: bool,
    pub help: bool,
    pub frames: usize,
    shown: Option<Report>,
    latest: Option<Report>,
}

impl ViewState {
    pub fn new(sort: Column, frames: usize) -> ViewState {
        ViewState {
            sort,
            descending: true,
            selected: None,
            expanded: HashSet::new(),
            paused: false,
            help: false,
            frames,
            shown: None,
            latest: None,
        }
    }

    /// A new report; shown at once unless paused.
    pub fn update(&mut self, report: &Report) {
        if self.paused {
            self.latest = Some(report.clone());
        } else {
            self.shown = Some(report.clone());
        }
    }

    fn rows(&self) -> Vec<&ProcessReport> {
        let Some(r) = &self.shown else {
            return Vec::new();
        };
        let mut rows: Vec<&ProcessReport> = r.processes.iter().collect();
        rows.sort_by(|a, b| {
            let o = self.sort.cmp(a, b);
            let o = if self.descending { o.reverse() } else { o };
            o.then(a.tgid.cmp(&b.tgid))
        });
        rows
    }

    fn move_selection(&mut self, delta: isize) {
        let pids: Vec<u32> = self.rows().iter().map(|p| p.tgid).collect();
        if pids.is_empty() {
            return;
        }
        let at = self
            .selected
            .and_then(|s| pids.iter().position(|&p| p == s));
        let next = match at {
            None => 0,
            Some(i) => i.saturating_add_signed(delta).min(pids.len() - 1),
        };
        self.selected = Some(pids[next]);
    }

    pub fn key(&mut self, key: KeyEvent) -> Action {
        if key.kind == KeyEventKind::Release {
            return Action::None;
        }
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        match key.code {
            // Raw mode turns Ctrl-C into a key; it still means stop.
            KeyCode::Char('c') if ctrl => return Action::Quit,
            KeyCode::Char('q') | KeyCode::Esc => return Action::Quit,
            KeyCode::Char('p') | KeyCode::Char(' ') => {
                self.paused = !self.paused;
                if !self.paused {
                    if let Some(r) = self.latest.take() {
                        self.shown = Some(r);
                    }
                }
            }
            KeyCode::Char('?') | KeyCode::Char('h') => self.help = !self.help,
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::Enter | KeyCode::Char('e') => {
                if self.selected.is_none() {
                    self.move_selection(0);
                }
                if let Some(pid) = self.selected {
                    if !self.expanded.remove(&pid) {
                        self.expanded.insert(pid);
                    }
                }
            }
            KeyCode::Right | KeyCode::Char('>') => self.shift_sort(1),
            KeyCode::Left | KeyCode::Char('<') => self.shift_sort(-1),
            KeyCode::Char('r') => self.descending = !self.descending,
            // Direct picks, as in top(1): o outstanding, b bytes, g growth, a alloc rate, n pid.
            KeyCode::Char('o') => self.sort = Column::Outstanding,
            KeyCode::Char('b') => self.sort = Column::Bytes,
            KeyCode::Char('g') => self.sort = Column::Growth,
            KeyCode::Char('a') => self.sort = Column::AllocRate,
            KeyCode::Char('n') => self.sort = Column::Pid,
            KeyCode::Char('G') => return Action::Regroup,
            _ => return Action::None,
        }
        Action::Redraw
    }

    fn shift_sort(&mut self, delta: isize) {
        let i = COLUMNS.iter().position(|&c| c == self.sort).unwrap_or(0);
        let n = COLUMNS.len() as isize;
        self.sort = COLUMNS[((i as isize + delta).rem_euclid(n)) as usize];
    }

    /// The whole screen as lines, the selected row marked; `height` cuts the
    /// process area and scrolls it to keep the selection visible.
    pub fn lines(&self, height: usize) -> (Vec<Line<'static>>, Vec<Line<'static>>) {
        let mut head = Vec::new();
        let Some(r) = &self.shown else {
            head.push(Line::from("leaktrace — waiting for the first refresh…"));
            return (head, Vec::new());
        };
        let bold = Style::default().add_modifier(Modifier::BOLD);
        head.push(Line::from(vec![
            Span::styled(format!("leaktrace live — {}", r.traced()), bold),
            Span::raw(format!(
                "   up {:.0}s   {} processes   by {}",
                r.elapsed_s,
                r.processes.len(),
                r.group_by.name()
            )),
            if self.paused {
                Span::styled(
                    "   PAUSED (p resumes; counting continues)",
                    Style::default().add_modifier(Modifier::REVERSED),
                )
            } else {
                Span::raw("")
            },
        ]));
        if let Some(note) = crate::present::view::traced_exit_note(r) {
            head.push(Line::from(note));
        }
        if let Some(l) = &r.ledger {
            head.push(Line::from(crate::present::view::ledger_line(l)));
        }
        if let Some(s) = &r.slab {
            head.push(Line::from(format!(
                "slabinfo: {} active / {} objs of {} B   since attach {:+} objs ({:+.1}/s)",
                group(s.active_objs),
                group(s.num_objs),
                s.objsize,
                s.active_objs_delta,
                s.active_objs_per_sec
            )));
        }
        let t = &r.totals;
        let k = &r.kernel;
        head.push(Line::from(format!(
            "{}: {} outstanding ({})   allocs {}   frees {}   lost: ringbuf {} map-full {} frees {}",
            if r.kheap.is_some() {
                "samples since attach (not objects)"
            } else {
                "tracked since attach"
            },
            group(t.outstanding),
            human_bytes(t.outstanding_bytes),
            group(t.allocs),
            group(t.frees),
            group(k.allocs_lost_ringbuf),
            group(k.allocs_lost_map_full),
            group(k.frees_lost_ringbuf),
        )));
        for line in crate::present::kheap_view::compact(r) {
            head.push(Line::from(line));
        }
        head.push(Line::from(""));
        let mut title = String::new();
        for c in COLUMNS {
            let mark = if c == self.sort {
                if self.descending {
                    "▼"
                } else {
                    "▲"
                }
            } else {
                ""
            };
            let text = format!("{}{mark}", c.title());
            if c == Column::Comm {
                title.push_str(&format!(" {:<w$}", text, w = c.width()));
            } else {
                title.push_str(&format!(" {:>w$}", text, w = c.width()));
            }
        }
        title.push_str("  CGROUP");
        if r.kheap.is_some() {
            // The rows below count samples; the estimates are the lines above.
            head.push(Line::from(
                "the table counts SAMPLES, not objects: the estimates are above",
            ));
        }
        head.push(Line::styled(
            title,
            Style::default().add_modifier(Modifier::REVERSED),
        ));

        if r.group_by != GroupBy::Process {
            // Groups are summed in the run loop and come in --sort order.
            let text = crate::present::view::groups_text(r, self.frames);
            let body = text
                .lines()
                .map(|l| Line::from(l.to_string()))
                .take(height)
                .collect();
            return (head, body);
        }
        let mut body: Vec<Line<'static>> = Vec::new();
        let mut selected_at = 0;
        let rows = self.rows();
        if rows.is_empty() {
            body.push(Line::from("         (no matching allocations yet)"));
        }
        for p in rows {
            let is_sel = self.selected == Some(p.tgid);
            if is_sel {
                selected_at = body.len();
            }
            let open = self.expanded.contains(&p.tgid);
            let mut text = String::new();
            for c in COLUMNS {
                let cell = c.cell(p);
                if c == Column::Comm {
                    text.push_str(&format!(" {:<w$}", cell, w = c.width()));
                } else {
                    text.push_str(&format!(" {:>w$}", cell, w = c.width()));
                }
            }
            text.push_str(&format!(
                "  {} {}",
                p.pod.as_deref().or(p.cgroup.as_deref()).unwrap_or("?"),
                if p.stacks.is_empty() {
                    ""
                } else if open {
                    "[-]"
                } else {
                    "[+]"
                }
            ));
            // A visible marker as well as reverse video: the cursor must show on
            // a terminal without attributes, and in a captured pane.
            if is_sel {
                text.replace_range(0..1, ">");
            }
            let style = if is_sel {
                Style::default().add_modifier(Modifier::REVERSED)
            } else {
                Style::default()
            };
            body.push(Line::styled(text, style));
            if open {
                if let Some(cmd) = &p.cmdline {
                    body.push(Line::from(format!("          cmd: {cmd}")));
                }
                if p.fingerprinted == Some(false) {
                    body.push(Line::from(
                        "          user paths not fingerprintable (no frame pointers): stacks split by sampling only",
                    ));
                }
                for (i, s) in p.stacks.iter().enumerate() {
                    let tilde = if s.estimated { "~" } else { "" };
                    body.push(Line::styled(
                        format!(
                            "          stack #{}: {} outstanding ({tilde}{}), {tilde}{} allocs, {tilde}{} frees{}",
                            i + 1,
                            s.outstanding_label(group),
                            human_bytes(s.counts.outstanding_bytes),
                            group(s.counts.allocs),
                            group(s.counts.frees),
                            if s.partial { " [shared frames only]" } else { "" }
                        ),
                        bold,
                    ));
                    for (tag, frames) in [("k", &s.kernel), ("u", &s.user)] {
                        for f in frames.iter().take(self.frames) {
                            body.push(Line::from(format!("              {tag} {f}")));
                        }
                        if frames.len() > self.frames {
                            body.push(Line::from(format!(
                                "              {tag} ... {} more",
                                frames.len() - self.frames
                            )));
                        }
                    }
                }
            }
        }
        // Scroll so the selected row stays on screen.
        let skip = selected_at.saturating_sub(height.saturating_sub(1));
        let body = body.into_iter().skip(skip).take(height).collect();
        (head, body)
    }

    fn help_line(&self) -> Line<'static> {
        let text = if self.help {
            "q/Esc/^C quit (prints the final report)  p/space pause  ↑↓/j k select  Enter/e expand stacks  \
             ←→ sort column  r reverse  o b g a n sort by outstanding/bytes/growth/alloc-rate/pid  \
             G group by process/comm/parent/cgroup/container/pod/stack  ? close help"
        } else {
            "q quit  p pause  ↑↓ select  Enter expand  ←→ sort  r reverse  G group  ? help"
        };
        Line::styled(text, Style::default().add_modifier(Modifier::REVERSED))
    }

    pub fn draw(&self, frame: &mut Frame<'_>) {
        let area = frame.area();
        let help_height = if self.help { 2 } else { 1 };
        let (head, _) = self.lines(0);
        let [head_area, body_area, help_area] = Layout::vertical([
            Constraint::Length(head.len() as u16),
            Constraint::Min(0),
            Constraint::Length(help_height),
        ])
        .areas(area);
        let (head, body) = self.lines(usize::from(body_area.height));
        frame.render_widget(Paragraph::new(head), head_area);
        frame.render_widget(Paragraph::new(body), body_area);
        frame.render_widget(
            Paragraph::new(self.help_line()).wrap(ratatui::widgets::Wrap { trim: true }),
            help_area,
        );
    }
}

pub struct Tui {
    terminal: DefaultTerminal,
    events: EventStream,
    pub state: ViewState,
}

impl Tui {
    pub fn start(sort: SortKey, frames: usize) -> Result<Tui> {
        // Installs a panic hook that leaves raw mode and the alternate screen
        // before the panic message prints.
        let terminal = ratatui::try_init().context("setting up the terminal for --top")?;
        Ok(Tui {
            terminal,
            events: EventStream::new(),
            state: ViewState::new(sort.into(), frames),
        })
    }

    pub fn show(&mut self, report: &Report) -> Result<()> {
        self.state.update(report);
        self.redraw()
    }

    pub fn redraw(&mut self) -> Result<()> {
        let state = &self.state;
        self.terminal
            .draw(|f| state.draw(f))
            .context("drawing the live view")?;
        Ok(())
    }

    /// The next key or resize, turned into what the loop should do. Ends the
    /// view when the terminal's input ends or fails: it cannot be steered.
    pub async fn next_action(&mut self) -> Action {
        match self.events.next().await {
            Some(Ok(Event::Key(key))) => self.state.key(key),
            Some(Ok(Event::Resize(..))) => Action::Redraw,
            Some(Ok(_)) => Action::None,
            Some(Err(_)) | None => Action::Quit,
        }
    }
}

impl Drop for Tui {
    fn drop(&mut self) {
        let _ = self.terminal.show_cursor();
        restore();
    }
}

pub(super) fn restore() {
    if let Err(err) = ratatui::try_restore() {
        let _ = io::Write::flush(&mut io::stderr());
        eprintln!("leaktrace: could not restore the terminal: {err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slab::report::StackReport;

    fn report() -> Report {
        let proc_ = |tgid: u32, comm: &str, outstanding: u64, allocs: u64| ProcessReport {
            tgid,
            start_ns: 0,
            ppid: 0,
            parent_comm: None,
            exited: false,
            context: None,
            comm: comm.to_string(),
            cmdline: Some(format!("/bin/{comm}")),
            cgroup_id: 1,
            cgroup: Some("/".to_string()),
            pod: None,
            charged_elsewhere: None,
            counts: crate::slab::report::Counts {
                outstanding,
                outstanding_bytes: outstanding * 512,
                allocs,
                frees: allocs - outstanding,
            },
            alloc_rate: 0.0,
            growth_rate: 0.0,
            fingerprinted: Some(true),
            unfingerprinted_allocs: 0,
            stacks: vec![StackReport {
                kstack: crate::slab::report::StackId::EMPTY,
                ustack: crate::slab::report::StackId::EMPTY,
                counts: Default::default(),
                estimated: false,
                outstanding_low: 0,
                outstanding_high: 0,
                partial: false,
                stratum_outstanding: 0,
                kernel: vec!["user_preparse+0x2f".to_string()],
                user: vec!["main+0x1".to_string()],
                kernel_locations: Vec::new(),
                user_locations: Vec::new(),
            }],
        };
        Report {
            schema_version: crate::slab::report::SCHEMA_VERSION,
            kind: "snapshot",
            cache: "kmalloc-512".to_string(),
            source: crate::slab::report::MemorySource::Slab,
            aliases: Vec::new(),
            elapsed_s: 1.0,
            rss_bytes: None,
            meminfo: None,
            ledger: None,
            slab: None,
            totals: Default::default(),
            kernel: Default::default(),
            anomalies: Default::default(),
            stacks: Default::default(),
            age: Default::default(),
            processes: vec![proc_(10, "small", 5, 100), proc_(20, "big", 50, 60)],
            cgroups: Vec::new(),
            group_by: Default::default(),
            groups: Vec::new(),
            top_stacks: Vec::new(),
            traced: None,
            pages: None,
            kheap: None,
            counts_are: None,
        }
    }

    fn press(s: &mut ViewState, code: KeyCode) -> Action {
        s.key(KeyEvent::new(code, KeyModifiers::NONE))
    }

    fn text(s: &ViewState) -> Vec<String> {
        s.lines(100).1.iter().map(|l| l.to_string()).collect()
    }

    #[test]
    fn sorting_expanding_and_pausing() {
        let mut s = ViewState::new(Column::Outstanding, 8);
        s.update(&report());
        assert!(text(&s)[0].contains("big"), "{:?}", text(&s));
        press(&mut s, KeyCode::Char('a'));
        assert_eq!(s.sort, Column::AllocRate);
        press(&mut s, KeyCode::Right);
        assert_eq!(s.sort, Column::Allocs);
        assert!(text(&s)[0].contains("small"));
        press(&mut s, KeyCode::Char('r'));
        assert!(text(&s)[0].contains("big"));
        press(&mut s, KeyCode::Down);
        press(&mut s, KeyCode::Enter);
        assert!(s.expanded.contains(&20));
        assert!(text(&s).iter().any(|l| l.contains("k user_preparse+0x2f")));
        press(&mut s, KeyCode::Char('p'));
        let mut next = report();
        next.processes.clear();
        s.update(&next);
        assert_eq!(text(&s).iter().filter(|l| l.contains("small")).count(), 1);
        press(&mut s, KeyCode::Char('p'));
        assert!(text(&s)[0].contains("no matching allocations"));
        assert_eq!(
            s.key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Action::Quit
        );
    }

    #[test]
    fn grouped_reports_show_group_rows() {
        let mut s = ViewState::new(Column::Outstanding, 8);
        assert_eq!(press(&mut s, KeyCode::Char('G')), Action::Regroup);
        let mut r = report();
        r.group_by = GroupBy::Comm;
        r.groups = crate::slab::grouping::group(
            &r.processes,
            GroupBy::Comm,
            crate::slab::report::SortKey::Outstanding,
        );
        s.update(&r);
        let lines = text(&s);
        assert!(
            lines[0].contains("PROCESSES") && lines[0].contains("COMM"),
            "{lines:?}"
        );
        assert!(lines[1].ends_with("big"), "{lines:?}");
    }
}
