//! A live screen of pre-rendered text on the same ratatui machinery as the
//! slab tracer's `--top` ([`super::tui`]): alternate screen, raw-mode keys,
//! the terminal restored on quit, on error, when the loop ends on a signal
//! and on panic (ratatui's hook). `leaktrace memcg --top` draws its text view
//! here instead of clearing the screen with ANSI codes.

use anyhow::{Context, Result};
use crossterm::event::{Event, EventStream, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use futures_util::StreamExt;
use ratatui::{
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::Paragraph,
    DefaultTerminal,
};

use super::tui::{restore, Action};

pub struct TextScreen {
    terminal: DefaultTerminal,
    events: EventStream,
    text: String,
    help: &'static str,
}

impl TextScreen {
    /// Takes over the terminal; `help` is the line kept at the bottom.
    pub fn start(help: &'static str) -> Result<TextScreen> {
        let terminal = ratatui::try_init().context("setting up the terminal for --top")?;
        Ok(TextScreen {
            terminal,
            events: EventStream::new(),
            text: String::new(),
            help,
        })
    }

    pub fn show(&mut self, text: String) -> Result<()> {
        self.text = text;
        self.redraw()
    }

    /// The text from its first line, cut to the window so the header never
    /// scrolls away, and the help line under it.
    pub fn redraw(&mut self) -> Result<()> {
        let (text, help) = (&self.text, self.help);
        self.terminal
            .draw(|frame| {
                let [body, help_area] =
                    Layout::vertical([Constraint::Min(0), Constraint::Length(1)])
                        .areas(frame.area());
                let lines: Vec<Line<'_>> = text.lines().map(Line::raw).collect();
                frame.render_widget(Paragraph::new(lines), body);
                frame.render_widget(
                    Paragraph::new(Line::styled(
                        help,
                        Style::default().add_modifier(Modifier::REVERSED),
                    )),
                    help_area,
                );
            })
            .context("drawing the live view")?;
        Ok(())
    }

    /// The next key or resize, turned into what the loop should do. Ends the
    /// view when the terminal's input ends or fails: it cannot be steered.
    pub async fn next_action(&mut self) -> Action {
        match self.events.next().await {
            Some(Ok(Event::Key(key))) => key_action(key),
            Some(Ok(Event::Resize(..))) => Action::Redraw,
            Some(Ok(_)) => Action::None,
            Some(Err(_)) | None => Action::Quit,
        }
    }
}

impl Drop for TextScreen {
    fn drop(&mut self) {
        let _ = self.terminal.show_cursor();
        restore();
    }
}

/// q, Esc and Ctrl-C quit (raw mode turns Ctrl-C into a key; it still means stop).
fn key_action(key: KeyEvent) -> Action {
    if key.kind == KeyEventKind::Release {
        return Action::None;
    }
    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
    match key.code {
        KeyCode::Char('c') if ctrl => Action::Quit,
        KeyCode::Char('q') | KeyCode::Esc => Action::Quit,
        _ => Action::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quit_keys_quit_and_others_do_nothing() {
        let press = |code, modifiers| key_action(KeyEvent::new(code, modifiers));
        assert_eq!(press(KeyCode::Char('q'), KeyModifiers::NONE), Action::Quit);
        assert_eq!(press(KeyCode::Esc, KeyModifiers::NONE), Action::Quit);
        assert_eq!(
            press(KeyCode::Char('c'), KeyModifiers::CONTROL),
            Action::Quit
        );
        assert_eq!(press(KeyCode::Char('c'), KeyModifiers::NONE), Action::None);
        let mut release = KeyEvent::new(KeyCode::Char('q'), KeyModifiers::NONE);
        release.kind = KeyEventKind::Release;
        assert_eq!(key_action(release), Action::None);
    }
}
