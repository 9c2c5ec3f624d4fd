//! Payloads of the domain schemas (`ampybus-proto`) as typed archive rows: one row per record
//! of a batch payload, values in the column order of `ampybus::archive::Table`.

use ampybus::archive::{Cell, Numeric, Table};
use ampybus_proto::ampy::{bars, common, fills, fx, news, orders, positions, signals, ticks};
use prost::Message;

/// Rows of one payload: `(table, values)`.
pub type Rows = Vec<(Table, Vec<Cell>)>;

/// The typed rows of a raw (inflated) payload of schema `fqdn`: `Ok(rows)` (empty for a
/// schema without a table), `Err(reason)` when the bytes do not decode as `fqdn`.
pub fn rows(fqdn: &str, message_id: &str, payload: &[u8]) -> Result<Rows, String> {
    let mut out = Rows::with_capacity(1);
    let id = Cell::text(message_id);
    let mut push = |table: Table, idx: usize, mut cells: Vec<Cell>| {
        let mut row = Vec::with_capacity(cells.len() + 2);
        row.push(id.clone());
        row.push(Cell::Int4(i32::try_from(idx).unwrap_or(i32::MAX)));
        row.append(&mut cells);
        out.push((table, row));
    };
    fn dec<M: Message + Default>(fqdn: &str, b: &[u8]) -> Result<M, String> {
        M::decode(b).map_err(|e| format!("does not decode as {fqdn}: {e}"))
    }
    match fqdn {
        "ampy.bars.v1.BarBatch" => {
            let b: bars::v1::BarBatch = dec(fqdn, payload)?;
            for (i, bar) in b.bars.iter().enumerate() {
                push(Table::Bars, i, bar_cells(bar));
            }
        }
        "ampy.bars.v1.Bar" => push(Table::Bars, 0, bar_cells(&dec(fqdn, payload)?)),
        "ampy.ticks.v1.TickBatch" => {
            let b: ticks::v1::TickBatch = dec(fqdn, payload)?;
            for (i, t) in b.ticks.iter().enumerate() {
                if let Some((table, cells)) = tick_cells(t) {
                    push(table, i, cells);
                }
            }
        }
        "ampy.ticks.v1.Tick" => {
            if let Some((table, cells)) = tick_cells(&dec(fqdn, payload)?) {
                push(table, 0, cells);
            }
        }
        "ampy.ticks.v1.TradeTick" => push(Table::Trades, 0, trade_cells(&dec(fqdn, payload)?)),
        "ampy.ticks.v1.QuoteTick" => push(Table::Quotes, 0, quote_cells(&dec(fqdn, payload)?)),
        "ampy.orders.v1.OrderRequestBatch" => {
            let b: orders::v1::OrderRequestBatch = dec(fqdn, payload)?;
            for (i, o) in b.orders.iter().enumerate() {
                push(Table::Orders, i, order_cells(o));
            }
        }
        "ampy.orders.v1.OrderRequest" => push(Table::Orders, 0, order_cells(&dec(fqdn, payload)?)),
        "ampy.fills.v1.FillBatch" => {
            let b: fills::v1::FillBatch = dec(fqdn, payload)?;
            for (i, f) in b.fills.iter().enumerate() {
                push(Table::Fills, i, fill_cells(f));
            }
        }
        "ampy.fills.v1.FillEvent" => push(Table::Fills, 0, fill_cells(&dec(fqdn, payload)?)),
        "ampy.positions.v1.PositionBatch" => {
            let b: positions::v1::PositionBatch = dec(fqdn, payload)?;
            for (i, p) in b.positions.iter().enumerate() {
                push(Table::Positions, i, position_cells(p));
            }
        }
        "ampy.positions.v1.PositionSnapshot" => {
            push(Table::Positions, 0, position_cells(&dec(fqdn, payload)?))
        }
        "ampy.signals.v1.SignalBatch" => {
            let b: signals::v1::SignalBatch = dec(fqdn, payload)?;
            for (i, s) in b.signals.iter().enumerate() {
                push(Table::Signals, i, signal_cells(s));
            }
        }
        "ampy.signals.v1.Signal" => push(Table::Signals, 0, signal_cells(&dec(fqdn, payload)?)),
        "ampy.fx.v1.FxRateBatch" => {
            let b: fx::v1::FxRateBatch = dec(fqdn, payload)?;
            for (i, r) in b.rates.iter().enumerate() {
                push(Table::FxRates, i, fx_cells(r));
            }
        }
        "ampy.fx.v1.FxRate" => push(Table::FxRates, 0, fx_cells(&dec(fqdn, payload)?)),
        "ampy.news.v1.NewsBatch" => {
            let b: news::v1::NewsBatch = dec(fqdn, payload)?;
            for (i, n) in b.items.iter().enumerate() {
                push(Table::News, i, news_cells(n));
            }
        }
        "ampy.news.v1.NewsItem" => push(Table::News, 0, news_cells(&dec(fqdn, payload)?)),
        _ => {}
    }
    Ok(out)
}

/// A `google.protobuf.Timestamp` as a time (NULL when unset or out of range).
pub fn ts(t: &Option<prost_types::Timestamp>) -> Cell {
    Cell::time(
        t.as_ref().and_then(|t| {
            chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
        }),
    )
}

/// An `ampy.common.v1.Decimal` as a numeric (NULL when unset).
pub fn num(d: &Option<common::v1::Decimal>) -> Cell {
    Cell::numeric(d.as_ref().map(|d| Numeric::new(d.scaled, d.scale)))
}

/// A proto enum's number as a smallint.
fn small(v: i32) -> Cell {
    Cell::Int2(i16::try_from(v).unwrap_or(i16::MAX))
}

/// Symbol and MIC of a security (NULL when unset).
fn security(s: &Option<common::v1::SecurityId>) -> [Cell; 2] {
    match s {
        Some(s) => [Cell::opt_text(&s.symbol), Cell::opt_text(&s.mic)],
        None => [Cell::Null, Cell::Null],
    }
}

fn bar_cells(b: &bars::v1::Bar) -> Vec<Cell> {
    let [symbol, mic] = security(&b.security);
    vec![
        symbol,
        mic,
        ts(&b.start),
        ts(&b.end),
        num(&b.open),
        num(&b.high),
        num(&b.low),
        num(&b.close),
        num(&b.vwap),
        Cell::Int8(b.volume),
        Cell::Int8(b.trade_count),
        Cell::Bool(b.adjusted),
        small(b.adjustment_policy),
        ts(&b.event_time),
        ts(&b.ingest_time),
        ts(&b.as_of),
    ]
}

fn tick_cells(t: &ticks::v1::Tick) -> Option<(Table, Vec<Cell>)> {
    match t.kind.as_ref()? {
        ticks::v1::tick::Kind::Trade(tr) => Some((Table::Trades, trade_cells(tr))),
        ticks::v1::tick::Kind::Quote(q) => Some((Table::Quotes, quote_cells(q))),
    }
}

fn trade_cells(t: &ticks::v1::TradeTick) -> Vec<Cell> {
    let [symbol, mic] = security(&t.security);
    vec![
        symbol,
        mic,
        num(&t.price),
        Cell::Int8(t.size),
        Cell::opt_text(&t.venue),
        ts(&t.event_time),
        ts(&t.ingest_time),
    ]
}

fn quote_cells(q: &ticks::v1::QuoteTick) -> Vec<Cell> {
    let [symbol, mic] = security(&q.security);
    vec![
        symbol,
        mic,
        num(&q.bid),
        Cell::Int8(q.bid_size),
        num(&q.ask),
        Cell::Int8(q.ask_size),
        Cell::opt_text(&q.venue),
        ts(&q.event_time),
        ts(&q.ingest_time),
    ]
}

fn order_cells(o: &orders::v1::OrderRequest) -> Vec<Cell> {
    let [symbol, mic] = security(&o.security);
    vec![
        Cell::opt_text(&o.account_id),
        Cell::opt_text(&o.client_order_id),
        symbol,
        mic,
        small(o.side),
        small(o.order_type),
        small(o.tif),
        num(&o.quantity),
        num(&o.limit_price),
        num(&o.stop_price),
        Cell::opt_text(&o.venue),
        Cell::opt_text(&o.strategy_tag),
        ts(&o.created_at),
    ]
}

fn fill_cells(f: &fills::v1::FillEvent) -> Vec<Cell> {
    let [symbol, mic] = security(&f.security);
    vec![
        Cell::opt_text(&f.account_id),
        Cell::opt_text(&f.client_order_id),
        Cell::opt_text(&f.broker_order_id),
        symbol,
        mic,
        num(&f.price),
        num(&f.quantity),
        Cell::opt_text(&f.venue),
        ts(&f.event_time),
    ]
}

fn money(m: &Option<common::v1::Money>) -> [Cell; 2] {
    match m {
        Some(m) => [num(&m.amount), Cell::opt_text(&m.currency_code)],
        None => [Cell::Null, Cell::Null],
    }
}

fn position_cells(p: &positions::v1::PositionSnapshot) -> Vec<Cell> {
    let [symbol, mic] = security(&p.security);
    let [upnl, upnl_ccy] = money(&p.unrealized_pnl);
    let [rpnl, rpnl_ccy] = money(&p.realized_pnl);
    vec![
        Cell::opt_text(&p.account_id),
        symbol,
        mic,
        num(&p.quantity),
        num(&p.avg_price),
        upnl,
        upnl_ccy,
        rpnl,
        rpnl_ccy,
        ts(&p.as_of),
    ]
}

fn signal_cells(s: &signals::v1::Signal) -> Vec<Cell> {
    use signals::v1::signal::Value;
    let [symbol, mic] = security(&s.security);
    let (score, action) = match &s.value {
        Some(Value::Score(d)) => (num(&Some(*d)), Cell::Null),
        Some(Value::Action(a)) => (Cell::Null, small(*a)),
        None => (Cell::Null, Cell::Null),
    };
    vec![
        Cell::opt_text(&s.model_id),
        symbol,
        mic,
        small(s.r#type),
        Cell::opt_text(&s.horizon),
        ts(&s.generated_at),
        ts(&s.expires_at),
        score,
        action,
    ]
}

fn fx_cells(r: &fx::v1::FxRate) -> Vec<Cell> {
    let (base, quote) = match &r.pair {
        Some(p) => (Cell::opt_text(&p.base), Cell::opt_text(&p.quote)),
        None => (Cell::Null, Cell::Null),
    };
    vec![
        base,
        quote,
        num(&r.bid),
        num(&r.ask),
        num(&r.mid),
        ts(&r.as_of),
    ]
}

fn news_cells(n: &news::v1::NewsItem) -> Vec<Cell> {
    vec![
        Cell::opt_text(&n.id),
        Cell::opt_text(&n.source),
        Cell::opt_text(&n.url),
        Cell::opt_text(&n.headline),
        Cell::opt_text(&n.body),
        if n.tickers.is_empty() {
            Cell::Null
        } else {
            Cell::text(&n.tickers.join(","))
        },
        Cell::Int4(n.sentiment_score_bp),
        ts(&n.published_at),
        ts(&n.ingest_time),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_fits_its_table() {
        // Empty payloads decode as defaults: one row each for the single-record schemas.
        for fqdn in [
            "ampy.bars.v1.Bar",
            "ampy.ticks.v1.TradeTick",
            "ampy.ticks.v1.QuoteTick",
            "ampy.orders.v1.OrderRequest",
            "ampy.fills.v1.FillEvent",
            "ampy.positions.v1.PositionSnapshot",
            "ampy.signals.v1.Signal",
            "ampy.fx.v1.FxRate",
            "ampy.news.v1.NewsItem",
        ] {
            let r = rows(fqdn, "m", b"").unwrap();
            assert_eq!(r.len(), 1, "{fqdn}");
            let mut batch = ampybus::archive::ArchiveBatch::new();
            let (t, cells) = r.into_iter().next().unwrap();
            batch.push_row(t, cells).unwrap();
        }
        assert!(
            rows("ampy.metrics.v1.MetricBatch", "m", b"\xff")
                .unwrap()
                .is_empty()
        );
        let e = rows("ampy.bars.v1.BarBatch", "m", b"\xff\xff").unwrap_err();
        assert!(
            e.starts_with("does not decode as ampy.bars.v1.BarBatch"),
            "{e}"
        );
    }
}
