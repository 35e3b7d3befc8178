#!/usr/bin/env python3
"""Writes charts/clip-operator/dashboards/clip-operator.json, the Grafana dashboard over the
operator's and the workers' metrics. Edit the panels here, then run it (a test checks that every
metric the dashboard queries exists)."""
import json
import pathlib

OP = 'namespace=~"$namespace", name=~"$processor"'
WK = 'namespace=~"$namespace", processor=~"$processor"'
DS = {"type": "prometheus", "uid": "${datasource}"}


def panel(pid, title, targets, x, y, w=12, h=8, unit="short", kind="timeseries", desc=""):
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": l}
            for i, (e, l) in enumerate(targets)
        ],
    }


def row(pid, title, y):
    return {"id": pid, "type": "row", "title": title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}


panels = [
    row(1, "Queue and capacity", 0),
    panel(2, "Queue depth", [
        (f'sum by (namespace, name, state) (clip_operator_queue_messages{{{OP}}})',
         "{{namespace}}/{{name}} {{state}}"),
    ], 0, 1, desc="Visible and in-flight messages on each processor's queue, as the builtin scaler read them."),
    panel(3, "Workers: desired and ready", [
        (f'sum by (namespace, name) (clip_operator_desired_replicas{{{OP}}})', "{{namespace}}/{{name}} desired"),
        (f'sum by (namespace, processor) (clip_worker_ready{{{WK}}})', "{{namespace}}/{{processor}} ready"),
    ], 12, 1, desc="Replicas the scaler asked for against workers that loaded the model. A gap is a cold start."),
    panel(4, "Conditions", [
        (f'clip_operator_processor_condition{{{OP}}}', "{{namespace}}/{{name}} {{condition}}"),
    ], 0, 9, w=24, h=6, kind="state-timeline", desc="1 when the condition is True."),
    row(5, "Throughput", 15),
    panel(6, "Images embedded per second", [
        (f'sum by (namespace, processor) (rate(clip_worker_images_embedded_total{{{WK}}}[1m]))',
         "{{namespace}}/{{processor}}"),
    ], 0, 16, unit="ops"),
    panel(7, "Batch size", [
        (f'sum(rate(clip_worker_batch_size_sum{{{WK}}}[5m])) / sum(rate(clip_worker_batch_size_count{{{WK}}}[5m]))', "mean"),
        (f'histogram_quantile(0.95, sum by (le) (rate(clip_worker_batch_size_bucket{{{WK}}}[5m])))', "p95"),
    ], 12, 16, desc="Images per forward pass. Small batches under a deep queue: set BATCH_WAIT_MS or RECEIVE_CONCURRENCY in spec.worker.env."),
    panel(8, "Messages by outcome", [
        (f'sum by (outcome) (rate(clip_worker_messages_total{{{WK}}}[5m]))', "{{outcome}}"),
    ], 0, 24, unit="ops"),
    panel(9, "In-flight messages", [
        (f'sum by (namespace, processor) (clip_worker_in_flight_messages{{{WK}}})', "{{namespace}}/{{processor}}"),
    ], 12, 24),
    row(10, "Errors", 32),
    panel(11, "Worker failures", [
        (f'sum by (outcome) (rate(clip_worker_messages_total{{{WK}, outcome=~"failed_permanent|retried_transient"}}[5m]))',
         "{{outcome}}"),
        (f'sum(rate(clip_worker_images_failed_total{{{WK}}}[5m]))', "images failed"),
    ], 0, 33, unit="ops", desc="failed_permanent went to the failure queue or the dead-letter queue; retried_transient will be retried."),
    panel(12, "Operator reconcile failures", [
        ('sum by (error) (rate(clip_operator_reconcile_failures_total[5m]))', "{{error}}"),
        ('sum(rate(clip_operator_reconciles_total[5m]))', "reconciles"),
    ], 12, 33, unit="ops"),
    row(13, "Latency", 41),
    panel(14, "Stage latency (p95)", [
        (f'histogram_quantile(0.95, sum by (le, stage) (rate(clip_worker_stage_seconds_bucket{{{WK}}}[5m])))', "{{stage}}"),
    ], 0, 42, unit="s", desc="fetch, preprocess, infer, write, publish, delete."),
    panel(15, "Queue wait (p95)", [
        (f'histogram_quantile(0.95, sum by (le) (rate(clip_worker_queue_wait_seconds_bucket{{{WK}}}[5m])))', "p95"),
        (f'histogram_quantile(0.5, sum by (le) (rate(clip_worker_queue_wait_seconds_bucket{{{WK}}}[5m])))', "p50"),
    ], 12, 42, unit="s", desc="From enqueue to receive: how long images wait for capacity (cold starts show here)."),
    panel(16, "Reconcile duration (p95)", [
        ('histogram_quantile(0.95, sum by (le) (rate(clip_operator_reconcile_duration_seconds_bucket[5m])))', "p95"),
    ], 0, 50, unit="s"),
    panel(17, "Scaler decisions", [
        (f'sum by (namespace, name, reason) (increase(clip_operator_scaler_decisions_total{{{OP}}}[5m]))',
         "{{namespace}}/{{name}} {{reason}}"),
    ], 12, 50),
]

dashboard = {
    "title": "CLIP processors",
    "uid": "clip-operator",
    "tags": ["clip", "lakechain", "embeddings"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
        {"name": "namespace", "type": "query", "datasource": DS, "label": "Namespace",
         "query": "label_values(clip_operator_desired_replicas, namespace)",
         "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2},
        {"name": "processor", "type": "query", "datasource": DS, "label": "Processor",
         "query": 'label_values(clip_operator_desired_replicas{namespace=~"$namespace"}, name)',
         "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2},
    ]},
    "panels": panels,
}

out = pathlib.Path(__file__).resolve().parent.parent / "charts/clip-operator/dashboards/clip-operator.json"
out.write_text(json.dumps(dashboard, indent=2) + "\n")
print(out)
