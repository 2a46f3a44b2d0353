"""metergate's Grafana dashboards, as code.

Writes deploy/grafana/dashboards/*.json with the Grafana Foundation SDK (the Grafana 11 build, pinned in
pyproject.toml: the unpinned package is the Grafana 10 build).

    .venv/bin/python deploy/grafana/dashboards.py            # regenerate the JSON
    .venv/bin/python deploy/grafana/dashboards.py --check    # exit 1 if the committed JSON is stale

Two dashboards, both reading the Prometheus data source with uid `prometheus`:

- "LLM cost overview" (uid metergate-overview): tokens, spend, top consumers, cost by model, latency, errors,
  alerts, month-end forecasts and unpriced traffic, filtered by the team/app/provider/model variables.
- "LLM team chargeback" (uid metergate-chargeback): one team's spend, budgets, forecast and usage.

Queries use only the metrics of the metrics contract (README "Metrics" and the budget gauges). Counters are read
with rate()/increase(); the budget gauges are the same on every replica, so they are aggregated with max.

Other code (the Prometheus integration test) uses `panel_queries()` to list every query of a generated dashboard
and `substitute()` to replace the dashboard variables with concrete values before sending a query to Prometheus.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions, TableSortByFieldState, VizLegendOptions
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "dashboards"

DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="prometheus")
# The provisioned data source's name (deploy/grafana/provisioning/datasources/prometheus.yml): the alert list
# panel selects its rule source by name, not by uid.
DATASOURCE_NAME = "Prometheus"
DEFAULT_USD_PER_TOKEN = "0.00002"

# Every query of the overview filters on the four variables. The budget gauges carry only team and app, and a
# team-wide budget has no app label: `app=~"$app|"` keeps the team-wide scope whatever apps are selected.
SEL = 'team=~"$team", app=~"$app", model=~"$model", provider=~"$provider"'
BUDGET_SEL = 'team=~"$team", app=~"$app|"'
# The chargeback dashboard is about one team (a single-select variable).
TEAM_SEL = 'team=~"$team"'

USD = "currencyUSD"
TOKENS = "short"


# ---------------------------------------------------------------- building blocks


def query(
    expr: str, legend: str = "__auto", *, ref: str = "A", instant: bool = False, as_table: bool = False
) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE).legend_format(legend)
    q = q.instant() if instant or as_table else q.range()
    if as_table:
        q = q.format(PromQueryFormat.TABLE)
    return q


def tokens_sum(selector: str, window: str, by: str) -> str:
    """Input plus output tokens over a window, summed by `by`.

    Written as the recording rules write it: a group present on one side only (input tokens but no output) is
    not dropped by the `+`, it falls back to that side.
    """
    tokens_in = f"sum by ({by}) (increase(llm_tokens_in{{{selector}}}[{window}]))"
    tokens_out = f"sum by ({by}) (increase(llm_tokens_out{{{selector}}}[{window}]))"
    return f"({tokens_in} + {tokens_out}) or {tokens_in} or {tokens_out}"


def whole_team(expr: str) -> str:
    """Shows a team-wide budget scope (no app label) as app "(whole team)"."""
    return f'label_replace({expr}, "app", "(whole team)", "app", "")'


def thresholds(*steps: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    return (
        dashboard.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(value=value, color=color) for value, color in steps])
    )


def reduce_last() -> ReduceDataOptions:
    return ReduceDataOptions().calcs(["lastNotNull"]).values(False)


def legend_table(*calcs: str) -> VizLegendOptions:
    return (
        VizLegendOptions()
        .display_mode(common.LegendDisplayMode.TABLE)
        .placement(common.LegendPlacement.RIGHT if calcs else common.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(list(calcs))
    )


def stat_panel(title: str, description: str, unit: str, *targets: prometheus.Dataquery) -> stat.Panel:
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(4)
        .span(4)
        .graph_mode(common.BigValueGraphMode.NONE)
        .color_mode(common.BigValueColorMode.VALUE)
        .reduce_options(reduce_last())
        .thresholds(thresholds((None, "blue")))
    )
    for target in targets:
        panel = panel.with_target(target)
    return panel


def timeseries_panel(
    title: str, description: str, unit: str, *targets: prometheus.Dataquery, span: int = 12
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(8)
        .span(span)
        .min(0)
        .fill_opacity(10)
        .legend(legend_table("mean", "max", "lastNotNull"))
    )
    for target in targets:
        panel = panel.with_target(target)
    return panel


def bargauge_panel(
    title: str, description: str, unit: str, target: prometheus.Dataquery, *, span: int = 12
) -> bargauge.Panel:
    return (
        bargauge.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(8)
        .span(span)
        .min(0)
        .orientation(common.VizOrientation.HORIZONTAL)
        .display_mode(common.BarGaugeDisplayMode.GRADIENT)
        .reduce_options(reduce_last())
        .thresholds(thresholds((None, "green")))
        .with_target(target)
    )


def table_panel(
    title: str,
    description: str,
    unit: str,
    targets: list[tuple[str, str]],
    *,
    span: int = 12,
    height: int = 8,
    units: Mapping[str, str] | None = None,
) -> table.Panel:
    """A table of instant queries merged on their labels; `targets` is (column name, expr), in column order."""
    panel = (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(height)
        .span(span)
        .align(common.FieldTextAlignment.AUTO)
        .inspect(False)
    )
    refs = "ABCDEFGH"
    rename: dict[str, str] = {}
    for i, (column, expr) in enumerate(targets):
        ref = refs[i]
        panel = panel.with_target(query(expr, ref=ref, as_table=True))
        rename["Value" if len(targets) == 1 else f"Value #{ref}"] = column
    panel = panel.with_transformation(model.DataTransformerConfig(id_val="merge", options={}))
    panel = panel.with_transformation(
        model.DataTransformerConfig(
            id_val="organize",
            options={"excludeByName": {"Time": True}, "indexByName": {}, "renameByName": rename},
        )
    )
    panel = panel.sort_by([TableSortByFieldState().display_name(targets[0][0]).desc(True)])
    for column, column_unit in (units or {}).items():
        panel = panel.override_by_name(column, [model.DynamicConfigValue(id_val="unit", value=column_unit)])
    return panel


def alert_list_panel(title: str, description: str) -> dashboard.Panel:
    """The SDK has no alert list builder; the generic panel builder writes the Grafana 11 alertlist options."""
    return (
        dashboard.Panel()
        .type("alertlist")
        .title(title)
        .description(description)
        .height(8)
        .span(12)
        .options(
            {
                "alertInstanceLabelFilter": "",
                "alertName": "",
                "dashboardAlerts": False,
                "datasource": DATASOURCE_NAME,
                "groupBy": [],
                "groupMode": "default",
                "maxItems": 20,
                "showInactiveAlerts": False,
                "sortOrder": 3,  # importance
                "stateFilter": {
                    "error": True,
                    "firing": True,
                    "noData": False,
                    "normal": False,
                    "pending": True,
                    "recovering": True,
                },
                "viewMode": "list",
            }
        )
    )


def label_variable(name: str, label: str, query_expr: str, description: str) -> dashboard.QueryVariable:
    """A multi-select query variable with "All" (matching every value, an empty one included)."""
    return (
        dashboard.QueryVariable(name)
        .label(label)
        .description(description)
        .datasource(DATASOURCE)
        .query(query_expr)
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_CASE_INSENSITIVE_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(model.VariableOption(selected=True, text=["All"], value=["$__all"]))
    )


# ---------------------------------------------------------------- LLM cost overview


def overview() -> dashboard.Dashboard:
    d = (
        dashboard.Dashboard("LLM cost overview")
        .uid("metergate-overview")
        .description("Who spends what on LLM APIs through metergate: tokens, dollars, budgets, latency and errors.")
        .tags(["metergate", "llm", "cost"])
        .editable()
        .timezone("browser")
        .time("now-24h", "now")
        .refresh("1m")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .with_variable(
            label_variable(
                "team", "Team", "label_values(llm_requests_total, team)", "Teams, from the gateway's config."
            )
        )
        .with_variable(
            label_variable(
                "app",
                "App",
                'label_values(llm_requests_total{team=~"$team"}, app)',
                "Apps of the selected teams.",
            )
        )
        .with_variable(
            label_variable(
                "provider",
                "Provider",
                'label_values(llm_requests_total{team=~"$team", app=~"$app"}, provider)',
                "Providers (the config's provider names) the selected teams and apps called.",
            )
        )
        .with_variable(
            label_variable(
                "model",
                "Model",
                'label_values(llm_requests_total{team=~"$team", app=~"$app", provider=~"$provider"}, model)',
                "Models (as sent upstream) the selected teams, apps and providers called.",
            )
        )
        .with_variable(
            dashboard.TextBoxVariable("usd_per_token")
            .label("Flat USD per token")
            .description("The seed's flat $/token rate for the estimate column; priced cost does not use it.")
            .default_value(DEFAULT_USD_PER_TOKEN)
            .current(model.VariableOption(selected=True, text=DEFAULT_USD_PER_TOKEN, value=DEFAULT_USD_PER_TOKEN))
        )
    )

    d = d.with_row(dashboard.Row("Tokens and spend"))
    for title, window, question in (
        ("Tokens, last 24 hours", "1d", "How many tokens (input + output) were billed in the last 24 hours?"),
        ("Tokens, last 7 days", "7d", "How many tokens (input + output) were billed in the last 7 days?"),
        ("Tokens, last 30 days", "30d", "How many tokens (input + output) were billed in the last 30 days?"),
    ):
        d = d.with_panel(
            stat_panel(
                title,
                f"{question} A rolling window, independent of the dashboard's time range; "
                "0 when nothing matches the filters.",
                TOKENS,
                query(
                    f"(sum(increase(llm_tokens_in{{{SEL}}}[{window}])) or vector(0))"
                    f" + (sum(increase(llm_tokens_out{{{SEL}}}[{window}])) or vector(0))",
                    "tokens",
                    instant=True,
                ),
            )
        )
    d = d.with_panel(
        stat_panel(
            "Priced spend in range",
            "How many dollars did the selected traffic cost over the dashboard's time range? Priced per request "
            "from the provider's own usage figures (llm_total_cost_usd).",
            USD,
            query(f"sum(increase(llm_total_cost_usd{{{SEL}}}[$__range])) or vector(0)", "USD", instant=True),
        )
    )
    d = d.with_panel(
        stat_panel(
            "Requests in range",
            "How many requests did the selected traffic make over the dashboard's time range?",
            TOKENS,
            query(f"sum(increase(llm_requests_total{{{SEL}}}[$__range])) or vector(0)", "requests", instant=True),
        )
    )
    d = d.with_panel(
        stat_panel(
            "Unpriced requests in range",
            "How many requests were for a model with no known price over the dashboard's time range? Their cost "
            "is missing from every dollar figure here: add a price for the model in the config.",
            TOKENS,
            query(
                f"sum(increase(llm_unpriced_requests_total{{{SEL}}}[$__range])) or vector(0)",
                "requests",
                instant=True,
            ),
        ).thresholds(thresholds((None, "green"), (1, "orange")))
    )

    d = d.with_row(dashboard.Row("Top consumers (dashboard time range)"))
    d = d.with_panel(
        bargauge_panel(
            "Top teams by cost",
            "Which teams spent the most over the dashboard's time range? The ten largest, priced cost.",
            USD,
            query(
                f"sort_desc(topk(10, sum by (team) (increase(llm_total_cost_usd{{{SEL}}}[$__range]))))",
                "{{team}}",
                instant=True,
            ),
            span=6,
        )
    )
    d = d.with_panel(
        bargauge_panel(
            "Top apps by cost",
            "Which apps spent the most over the dashboard's time range? The ten largest, priced cost.",
            USD,
            query(
                f"sort_desc(topk(10, sum by (team, app) (increase(llm_total_cost_usd{{{SEL}}}[$__range]))))",
                "{{team}} / {{app}}",
                instant=True,
            ),
            span=6,
        )
    )
    d = d.with_panel(
        bargauge_panel(
            "Top teams by tokens",
            "Which teams used the most tokens (input + output) over the dashboard's time range? The ten largest.",
            TOKENS,
            query(f"sort_desc(topk(10, {tokens_sum(SEL, '$__range', 'team')}))", "{{team}}", instant=True),
            span=6,
        )
    )
    d = d.with_panel(
        bargauge_panel(
            "Top apps by tokens",
            "Which apps used the most tokens (input + output) over the dashboard's time range? The ten largest.",
            TOKENS,
            query(
                f"sort_desc(topk(10, {tokens_sum(SEL, '$__range', 'team, app')}))",
                "{{team}} / {{app}}",
                instant=True,
            ),
            span=6,
        )
    )
    d = d.with_panel(
        timeseries_panel(
            "Cost rate by team",
            "Which teams are spending right now, and since when? Priced cost in USD per hour.",
            "currencyUSD",
            query(f"sum by (team) (rate(llm_total_cost_usd{{{SEL}}}[$__rate_interval])) * 3600", "{{team}}"),
        )
    )
    d = d.with_panel(
        table_panel(
            "Priced cost vs flat estimate by team",
            "How far is the classic flat-rate estimate (tokens x $usd_per_token) from the cost priced per model? "
            "Both columns are totals since each gateway process started (the seed query's form, "
            "sum by (team) (llm_tokens_in + llm_tokens_out) * rate), so they restart from zero with the gateway.",
            USD,
            [
                ("Priced (USD)", f"sum by (team) (llm_total_cost_usd{{{SEL}}})"),
                (
                    "Flat estimate (USD)",
                    f"sum by (team) (llm_tokens_in{{{SEL}}} + llm_tokens_out{{{SEL}}}) * $usd_per_token",
                ),
            ],
        )
    )

    d = d.with_row(dashboard.Row("Cost by model and provider"))
    d = d.with_panel(
        timeseries_panel(
            "Cost rate by provider and model",
            "Which models and providers are the money going to right now? Priced cost in USD per hour.",
            "currencyUSD",
            query(
                f"sum by (provider, model) (rate(llm_total_cost_usd{{{SEL}}}[$__rate_interval])) * 3600",
                "{{provider}} / {{model}}",
            ),
        )
    )
    d = d.with_panel(
        bargauge_panel(
            "Cost by provider and model in range",
            "Which models and providers cost the most over the dashboard's time range?",
            USD,
            query(
                f"sort_desc(sum by (provider, model) (increase(llm_total_cost_usd{{{SEL}}}[$__range])))",
                "{{provider}} / {{model}}",
                instant=True,
            ),
        )
    )

    d = d.with_row(dashboard.Row("Latency, errors and alerts"))
    latency = f"sum by (le) (rate(llm_latency_seconds_bucket{{{SEL}}}[$__rate_interval]))"
    d = d.with_panel(
        timeseries_panel(
            "Latency p50 / p95 / p99",
            "How long do requests take from start to the last byte, at the median and the tail?",
            "s",
            query(f"histogram_quantile(0.5, {latency})", "p50", ref="A"),
            query(f"histogram_quantile(0.95, {latency})", "p95", ref="B"),
            query(f"histogram_quantile(0.99, {latency})", "p99", ref="C"),
        )
    )
    d = d.with_panel(
        timeseries_panel(
            "Latency p95 by provider and model",
            "Which provider and model is slow? 95th percentile of request start to last byte.",
            "s",
            query(
                "histogram_quantile(0.95, sum by (le, provider, model) "
                f"(rate(llm_latency_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                "{{provider}} / {{model}}",
            ),
        )
    )
    errors = f"sum by (provider, team) (rate(llm_errors_total{{{SEL}}}[$__rate_interval]))"
    requests = f"sum by (provider, team) (rate(llm_requests_total{{{SEL}}}[$__rate_interval]))"
    d = d.with_panel(
        timeseries_panel(
            "Error rate by provider and team",
            "Which provider and team see failing requests, and what share of their requests fail? "
            "Gateway and upstream errors (llm_errors_total / llm_requests_total); 0 where a group had no error.",
            "percentunit",
            query(f"({errors} or 0 * {requests}) / {requests}", "{{provider}} / {{team}}"),
        )
    )
    d = d.with_panel(
        timeseries_panel(
            "Errors by type",
            "What kind of errors happen: rate limits (upstream_rate_limited), timeouts, client hang-ups...? "
            "Errors per second by error_type.",
            "reqps",
            query(
                f"sum by (error_type) (rate(llm_errors_total{{{SEL}}}[$__rate_interval]))",
                "{{error_type}}",
            ),
        )
    )
    d = d.with_panel(
        alert_list_panel(
            "Firing alerts",
            "Which metergate alerts (budgets, forecasts, error rates, gateway health) are firing or pending now? "
            "Read from the Prometheus rules; not filtered by the dashboard variables.",
        )
    )
    d = d.with_panel(
        table_panel(
            "Unpriced traffic by model",
            "Which models are used without a known price, by whom, over the dashboard's time range? Their cost is "
            "not in llm_total_cost_usd: give them a price in the config's prices section.",
            "short",
            [
                (
                    "Unpriced requests",
                    "sort_desc(sum by (provider, model, team) "
                    f"(increase(llm_unpriced_requests_total{{{SEL}}}[$__range])))",
                )
            ],
        )
    )

    d = d.with_row(dashboard.Row("Budgets: this month"))
    spend = f'max by (team, app) (llm_spend_usd{{{BUDGET_SEL}, period="month"}})'
    forecast = f'max by (team, app) (llm_spend_forecast_usd{{{BUDGET_SEL}, period="month"}})'
    budget = f'max by (team, app) (llm_budget_usd{{{BUDGET_SEL}, period="month"}})'
    d = d.with_panel(
        table_panel(
            "Month-end forecast vs budget",
            "Which teams and apps will end the month over budget? Spend so far this calendar month, the "
            "projected month-end spend and the monthly budget, per budget scope ((whole team) = team-wide). "
            "Every replica exports the same figures, hence max.",
            USD,
            [
                ("Forecast (USD)", whole_team(forecast)),
                ("Budget (USD)", whole_team(budget)),
                ("Forecast / budget", whole_team(f"{forecast} / {budget}")),
                ("Spent so far (USD)", whole_team(spend)),
            ],
            span=24,
            units={"Forecast / budget": "percentunit"},
        )
    )
    return d


# ---------------------------------------------------------------- LLM team chargeback


def chargeback() -> dashboard.Dashboard:
    d = (
        dashboard.Dashboard("LLM team chargeback")
        .uid("metergate-chargeback")
        .description("One team's LLM bill: spend by app and model, budgets, forecast, tokens, requests and errors.")
        .tags(["metergate", "llm", "cost", "chargeback"])
        .editable()
        .timezone("browser")
        .time("now-7d", "now")
        .refresh("5m")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .with_variable(
            dashboard.QueryVariable("team")
            .label("Team")
            .description("The team to charge back.")
            .datasource(DATASOURCE)
            .query("label_values(llm_requests_total, team)")
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(model.VariableSort.ALPHABETICAL_CASE_INSENSITIVE_ASC)
            .multi(False)
            .include_all(False)
        )
    )

    d = d.with_row(dashboard.Row("This month"))
    team_month = f'{TEAM_SEL}, app="", period="month"'
    d = d.with_panel(
        stat_panel(
            "Spent this month",
            "How much has the team spent so far in the current calendar month (the gateway's ledger)?",
            USD,
            query(f"max(llm_spend_usd{{{team_month}}})", "USD", instant=True),
        ).span(6)
    )
    d = d.with_panel(
        stat_panel(
            "Month-end forecast",
            "How much will the team have spent at the end of the month at its current pace?",
            USD,
            query(f"max(llm_spend_forecast_usd{{{team_month}}})", "USD", instant=True),
        ).span(6)
    )
    d = d.with_panel(
        stat_panel(
            "Monthly budget",
            "What is the team's team-wide monthly budget? Empty when the team has none.",
            USD,
            query(f"max(llm_budget_usd{{{team_month}}})", "USD", instant=True),
        )
        .span(6)
        .no_value("no budget")
    )
    d = d.with_panel(
        stat_panel(
            "Spend in range",
            "How much did the team spend over the dashboard's time range (priced per request)?",
            USD,
            query(f"sum(increase(llm_total_cost_usd{{{TEAM_SEL}}}[$__range])) or vector(0)", "USD", instant=True),
        ).span(6)
    )
    d = d.with_panel(
        bargauge_panel(
            "Budget use by period",
            "How much of each budget (day, week, month; team-wide or per app) has the team used? "
            "Spend so far in the current period divided by the budget.",
            "percentunit",
            query(
                whole_team(
                    f"max by (app, period) (llm_spend_usd{{{TEAM_SEL}}})"
                    f" / max by (app, period) (llm_budget_usd{{{TEAM_SEL}}})"
                ),
                "{{period}}: {{app}}",
                instant=True,
            ),
        )
        .max(1)
        .thresholds(thresholds((None, "green"), (0.8, "orange"), (1, "red")))
    )
    d = d.with_panel(
        table_panel(
            "Budgets: spend, forecast and limit",
            "Where does each of the team's budgets stand: spend so far, projected end-of-period spend, the limit "
            "and its warning ratio, per period and scope?",
            USD,
            [
                ("Spent so far (USD)", whole_team(f"max by (app, period) (llm_spend_usd{{{TEAM_SEL}}})")),
                ("Forecast (USD)", whole_team(f"max by (app, period) (llm_spend_forecast_usd{{{TEAM_SEL}}})")),
                ("Budget (USD)", whole_team(f"max by (app, period) (llm_budget_usd{{{TEAM_SEL}}})")),
                ("Warn at", whole_team(f"max by (app, period) (llm_budget_warn_ratio{{{TEAM_SEL}}})")),
            ],
            units={"Warn at": "percentunit"},
        )
    )

    d = d.with_row(dashboard.Row("Spend"))
    d = d.with_panel(
        timeseries_panel(
            "Spend by app",
            "Which of the team's apps is spending, and when? Priced cost in USD per hour.",
            "currencyUSD",
            query(f"sum by (app) (rate(llm_total_cost_usd{{{TEAM_SEL}}}[$__rate_interval])) * 3600", "{{app}}"),
        )
    )
    d = d.with_panel(
        timeseries_panel(
            "Spend by model",
            "Which models is the team paying for, and when? Priced cost in USD per hour.",
            "currencyUSD",
            query(
                f"sum by (provider, model) (rate(llm_total_cost_usd{{{TEAM_SEL}}}[$__rate_interval])) * 3600",
                "{{provider}} / {{model}}",
            ),
        )
    )
    by = "app, provider, model"
    d = d.with_panel(
        table_panel(
            "Bill by app and model in range",
            "What does the team owe, line by line, for the dashboard's time range: cost, tokens, requests and "
            "errors per app and model?",
            TOKENS,
            [
                ("Cost (USD)", f"sum by ({by}) (increase(llm_total_cost_usd{{{TEAM_SEL}}}[$__range]))"),
                ("Input tokens", f"sum by ({by}) (increase(llm_tokens_in{{{TEAM_SEL}}}[$__range]))"),
                ("Output tokens", f"sum by ({by}) (increase(llm_tokens_out{{{TEAM_SEL}}}[$__range]))"),
                ("Requests", f"sum by ({by}) (increase(llm_requests_total{{{TEAM_SEL}}}[$__range]))"),
                ("Errors", f"sum by ({by}) (increase(llm_errors_total{{{TEAM_SEL}}}[$__range]))"),
            ],
            span=24,
            height=10,
            units={"Cost (USD)": USD},
        )
    )

    d = d.with_row(dashboard.Row("Usage"))
    d = d.with_panel(
        timeseries_panel(
            "Tokens by app",
            "How many tokens per second does each app send and receive?",
            "short",
            query(f"sum by (app) (rate(llm_tokens_in{{{TEAM_SEL}}}[$__rate_interval]))", "{{app}} in", ref="A"),
            query(f"sum by (app) (rate(llm_tokens_out{{{TEAM_SEL}}}[$__rate_interval]))", "{{app}} out", ref="B"),
            span=8,
        )
    )
    d = d.with_panel(
        timeseries_panel(
            "Requests by app",
            "How many requests per second does each app make?",
            "reqps",
            query(f"sum by (app) (rate(llm_requests_total{{{TEAM_SEL}}}[$__rate_interval]))", "{{app}}"),
            span=8,
        )
    )
    d = d.with_panel(
        timeseries_panel(
            "Errors by app and type",
            "Which of the team's apps hit errors, and which kind (rate limits, timeouts, bad requests...)?",
            "reqps",
            query(
                f"sum by (app, error_type) (rate(llm_errors_total{{{TEAM_SEL}}}[$__rate_interval]))",
                "{{app}}: {{error_type}}",
            ),
            span=8,
        )
    )
    return d


# ---------------------------------------------------------------- output

DASHBOARDS = {"metergate-overview": overview, "metergate-chargeback": chargeback}


def build(builder: dashboard.Dashboard) -> dict[str, Any]:
    """The dashboard as plain JSON data, with panel ids numbered in order."""
    board = builder.build()
    for number, panel in enumerate(board.panels or [], start=1):
        panel.id_val = number
    data: dict[str, Any] = json.loads(JSONEncoder(sort_keys=True).encode(board))
    # Grafana adds its built-in "Annotations & Alerts" query to this list when it loads the dashboard.
    data.setdefault("annotations", {}).setdefault("list", [])
    return data


def render(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def generate() -> dict[Path, str]:
    """Every dashboard file and its content."""
    return {OUT_DIR / f"{uid}.json": render(build(make())) for uid, make in DASHBOARDS.items()}


def panel_queries(dashboard_json: Mapping[str, Any] | str) -> list[tuple[str, str]]:
    """(panel title, expr) for every Prometheus query of a dashboard, rows' nested panels included."""
    data = json.loads(dashboard_json) if isinstance(dashboard_json, str) else dashboard_json
    out: list[tuple[str, str]] = []

    def walk(panels: list[Mapping[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets") or []:
                if target.get("expr"):
                    out.append((panel.get("title", ""), target["expr"]))
            walk(panel.get("panels") or [])

    walk(data.get("panels") or [])
    return out


# What substitute() uses for a variable it is not given: every label value, the flat rate, and intervals that
# suit a Prometheus scraping every 15 s.
DEFAULT_VALUES: dict[str, str] = {
    "team": ".*",
    "app": ".*",
    "model": ".*",
    "provider": ".*",
    "usd_per_token": DEFAULT_USD_PER_TOKEN,
    "__range": "1h",
    "__rate_interval": "1m",
    "__interval": "15s",
}
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)|\[\[(\w+)\]\]")


def substitute(expr: str, values: Mapping[str, str] | None = None) -> str:
    """Replaces $team, $app, $model, $provider, $usd_per_token, $__range, $__rate_interval and $__interval.

    `values` maps a variable name (no `$`) to the text that replaces it, e.g. {"team": "search|ads",
    "__range": "6h"}; variables it does not name get DEFAULT_VALUES. Grafana writes a multi-value selection as
    a regex alternation, so pass "a|b" for two values. An unknown variable is an error, so nothing is left for
    Prometheus to reject.
    """
    merged = {**DEFAULT_VALUES, **(values or {})}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in merged:
            raise KeyError(f"no value for dashboard variable ${name} in {expr!r}")
        return merged[name]

    return _VARIABLE.sub(replace, expr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs")
    args = parser.parse_args(argv)
    stale = []
    for path, content in generate().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == content:
            continue
        if args.check:
            stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
            print(f"wrote {path.relative_to(HERE.parent.parent)}")
    if stale:
        for path in stale:
            print(f"stale: {path} (run: python deploy/grafana/dashboards.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
