// Live training chart for the "LTX2AV Train LoRA" node (LTX2AV_TrainLoRA).
//
// Draws video loss, audio loss (left axis) and the audio loss weight (right axis) per step on a plain
// canvas, plus a status line (step/total, s/step, ETA). Fed by the "ltx2av.train" websocket event the node
// sends after every step, filtered by node id. The node's `ltx2av_history` ui payload (every step of the
// run) replaces it when the queue ends (onExecuted), when a finished job is loaded from the queue
// (onNodeOutputsUpdated), and after a page reload, from the server's /history (afterConfigureGraph). Its
// `ltx2av_status` line (what the queue trained, or that the run already has all its steps) leads the status.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "LTX2AV_TrainLoRA";
const EVENT = "ltx2av.train";
const HISTORY_KEY = "ltx2av_history";
const STATUS_KEY = "ltx2av_status";
const WIDGET_NAME = "ltx2av_chart";
const CHART_HEIGHT = 180;
const SMOOTHING = 0.9; // EMA factor for the bold line; the raw values are drawn faint underneath
const HISTORY_LOOKBACK = 64; // finished prompts searched for a run to show after a page reload

// Key in the step dict, legend label, colour, axis ("loss" left, "weight" right) and how it is drawn; dotted and
// optional series are left out of the legend when no step has them.
const SERIES = [
  { key: "loss_video", label: "video loss", color: "#4ea1ff", axis: "loss" },
  { key: "loss_audio", label: "audio loss", color: "#ff9f43", axis: "loss" },
  { key: "val_loss_video", label: "val video", color: "#4ea1ff", axis: "loss", dots: true },
  { key: "val_loss_audio", label: "val audio", color: "#ff9f43", axis: "loss", dots: true },
  // Missing-audio regulariser (silence / audio DOP): only on steps that drew an audio-free clip.
  { key: "loss_regularizer", label: "regulariser", color: "#b07cf0", axis: "loss", dots: true },
  // Representation regularisers (crepa / self_flow sections), unweighted, on every step of a run that has them.
  { key: "loss_crepa", label: "CREPA", color: "#e84393", axis: "loss", optional: true },
  { key: "loss_self_flow", label: "Self-Flow", color: "#00b894", axis: "loss", optional: true },
  { key: "loss_self_flow_frame", label: "Self-Flow frame", color: "#55efc4", axis: "loss", optional: true },
  { key: "loss_self_flow_delta", label: "Self-Flow delta", color: "#81ecec", axis: "loss", optional: true },
  { key: "audio_weight", label: "audio weight", color: "#2ecc71", axis: "weight", dashed: true },
];

/** Charts of the Train nodes currently in the graph, so one websocket listener can feed them all. */
const liveCharts = new Set();

function formatDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const pad = (n) => String(n).padStart(2, "0");
  return h > 0 ? `${h}:${pad(m)}:${pad(s % 60)}` : `${m}:${pad(s % 60)}`;
}

function formatNumber(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  return Math.abs(value) >= 100 ? value.toFixed(0) : value.toPrecision(3);
}

function isNumber(value) {
  return typeof value === "number" && Number.isFinite(value);
}

/** [min, max] of the finite values, widened a little so flat lines stay visible. */
function valueRange(values) {
  const finite = values.filter(isNumber);
  if (finite.length === 0) return null;
  let lo = Math.min(...finite);
  let hi = Math.max(...finite);
  const pad = hi > lo ? (hi - lo) * 0.08 : Math.max(Math.abs(hi) * 0.1, 1e-3);
  return [lo - pad, hi + pad];
}

class LossChart {
  constructor(node) {
    this.node = node;
    this.history = []; // one step dict per optimizer step, ordered by step
    this.note = ""; // the server's line about the last queue (STATUS_KEY)

    this.element = document.createElement("div");
    this.element.className = "ltx2av-chart";
    Object.assign(this.element.style, {
      display: "flex", flexDirection: "column", gap: "2px", width: "100%", height: "100%",
      boxSizing: "border-box", font: "11px sans-serif", color: "var(--input-text, #ddd)",
    });
    this.status = document.createElement("div");
    this.status.className = "ltx2av-chart-status";
    Object.assign(this.status.style, { whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis" });
    this.canvas = document.createElement("canvas");
    Object.assign(this.canvas.style, {
      flex: "1 1 auto", width: "100%", minHeight: "0", borderRadius: "4px",
      background: "var(--comfy-input-bg, #1e1e1e)",
    });
    this.element.append(this.status, this.canvas);

    // The DOM widget resizes the element with the node: redraw at the new pixel size.
    this.resizeObserver = new ResizeObserver(() => this.draw());
    this.resizeObserver.observe(this.canvas);
    this.render();
  }

  /** Add one live step. A step at or before the last one means a new run (or a re-run): drop the overlap. */
  push(step) {
    const last = this.history[this.history.length - 1];
    if (last && step.step <= last.step) {
      this.history = this.history.filter((entry) => entry.step < step.step);
    }
    this.history.push(step);
    this.note = ""; // a queue is running: the live step is the news
    this.render();
  }

  /** Replace everything with the run's full history and the queue's status line (the node's ui payload). */
  setOutput(output) {
    if (Array.isArray(output?.[HISTORY_KEY])) this.history = [...output[HISTORY_KEY]].sort((a, b) => a.step - b.step);
    if (Array.isArray(output?.[STATUS_KEY])) this.note = String(output[STATUS_KEY][0] ?? "");
    this.render();
  }

  render() {
    this.status.textContent = this.statusText();
    this.draw();
  }

  statusText() {
    const last = this.history[this.history.length - 1];
    if (!last) return this.note || "LTX-2 AV training: waiting for the first step…";
    const parts = [
      ...(this.note ? [this.note] : []),
      `step ${last.step}/${last.total ?? "?"}`,
      `${formatNumber(last.step_time_s)} s/step`,
      `ETA ${formatDuration(last.eta_s)}`,
      `video ${formatNumber(last.loss_video)}`,
      `audio ${formatNumber(last.loss_audio)}`,
      `weight ${formatNumber(last.audio_weight)}`,
    ];
    // The latest A/B validation sample's voice scores (validation.sample_every_steps), when there is one.
    const scored = [...this.history].reverse().find((p) => p.val_voice_score_lora !== undefined);
    if (scored) {
      parts.push(`voice ${formatNumber(scored.val_voice_score_lora)} vs base ${formatNumber(scored.val_voice_score_base)} @${scored.step}`);
    }
    return parts.join(" · ");
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (width < 20 || height < 20) return; // hidden (collapsed node, zoomed out)
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = "10px sans-serif";

    const plot = { left: 44, right: width - 40, top: 18, bottom: height - 16 };
    this.drawLegend(ctx, plot);
    if (this.history.length === 0 || plot.right <= plot.left || plot.bottom <= plot.top) return;

    const steps = this.history.map((entry) => entry.step);
    const firstStep = steps[0];
    const lastStep = Math.max(steps[steps.length - 1], firstStep + 1);
    const ranges = {
      loss: valueRange(SERIES.filter((s) => s.axis === "loss").flatMap((s) => this.history.map((e) => e[s.key]))),
      weight: valueRange(this.history.map((e) => e.audio_weight)),
    };
    const x = (step) => plot.left + ((step - firstStep) / (lastStep - firstStep)) * (plot.right - plot.left);
    const yFor = (axis) => (value) => {
      const [lo, hi] = ranges[axis];
      return plot.bottom - ((value - lo) / (hi - lo)) * (plot.bottom - plot.top);
    };

    this.drawAxes(ctx, plot, ranges, firstStep, lastStep);
    for (const series of SERIES) {
      if (!ranges[series.axis]) continue;
      const points = this.history
        .filter((entry) => isNumber(entry[series.key]))
        .map((entry) => [x(entry.step), entry[series.key]]);
      if (points.length === 0) continue;
      const y = yFor(series.axis);
      if (series.dots) {
        drawDots(ctx, points.map(([px, v]) => [px, y(v)]), series.color);
      } else if (series.dashed) {
        drawLine(ctx, points.map(([px, v]) => [px, y(v)]), series.color, 1.5, [4, 3]);
      } else {
        drawLine(ctx, points.map(([px, v]) => [px, y(v)]), series.color + "55", 1);
        drawLine(ctx, smooth(points).map(([px, v]) => [px, y(v)]), series.color, 2);
      }
    }
  }

  drawLegend(ctx, plot) {
    let cursor = plot.left;
    ctx.textBaseline = "middle";
    for (const series of SERIES) {
      if ((series.dots || series.optional) && !this.history.some((entry) => isNumber(entry[series.key]))) continue;
      ctx.fillStyle = series.color;
      ctx.fillRect(cursor, 6, 10, 3);
      ctx.fillStyle = "#bbb";
      ctx.fillText(series.label, cursor + 13, 8);
      cursor += 18 + ctx.measureText(series.label).width;
    }
  }

  drawAxes(ctx, plot, ranges, firstStep, lastStep) {
    ctx.strokeStyle = "#555";
    ctx.lineWidth = 1;
    ctx.strokeRect(plot.left, plot.top, plot.right - plot.left, plot.bottom - plot.top);
    ctx.fillStyle = "#999";
    ctx.textBaseline = "middle";
    const ticks = 4;
    for (let i = 0; i <= ticks; i++) {
      const py = plot.bottom - (i / ticks) * (plot.bottom - plot.top);
      if (ranges.loss) {
        const [lo, hi] = ranges.loss;
        ctx.textAlign = "right";
        ctx.fillText(formatNumber(lo + (i / ticks) * (hi - lo)), plot.left - 4, py);
      }
      if (ranges.weight) {
        const [lo, hi] = ranges.weight;
        ctx.textAlign = "left";
        ctx.fillText(formatNumber(lo + (i / ticks) * (hi - lo)), plot.right + 4, py);
      }
    }
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    ctx.fillText(String(firstStep), plot.left, plot.bottom + 3);
    ctx.textAlign = "right";
    ctx.fillText(`step ${lastStep}`, plot.right, plot.bottom + 3);
    ctx.textAlign = "left";
  }

  remove() {
    this.resizeObserver.disconnect();
    liveCharts.delete(this);
  }
}

/** Exponential moving average of [x, value] points (bias-corrected so the line starts at the first value). */
function smooth(points) {
  let average = 0;
  return points.map(([px, value], i) => {
    average = SMOOTHING * average + (1 - SMOOTHING) * value;
    return [px, average / (1 - SMOOTHING ** (i + 1))];
  });
}

function drawLine(ctx, points, color, width, dash = []) {
  ctx.save();
  ctx.strokeStyle = color;
  ctx.lineWidth = width;
  ctx.setLineDash(dash);
  ctx.beginPath();
  points.forEach(([px, py], i) => (i === 0 ? ctx.moveTo(px, py) : ctx.lineTo(px, py)));
  ctx.stroke();
  ctx.restore();
}

function drawDots(ctx, points, color) {
  ctx.save();
  ctx.fillStyle = color;
  ctx.strokeStyle = "#fff";
  for (const [px, py] of points) {
    ctx.beginPath();
    ctx.arc(px, py, 3, 0, 2 * Math.PI);
    ctx.fill();
    ctx.stroke();
  }
  ctx.restore();
}

/** The node an execution id names: "12" in the root graph, "5:12" inside the subgraph of node 5. */
function nodeForExecutionId(executionId) {
  let graph = app.rootGraph ?? app.graph;
  let node = null;
  for (const part of String(executionId).split(":")) {
    node = graph?.getNodeById(part) ?? graph?.getNodeById(Number(part)) ?? null;
    graph = node?.subgraph;
  }
  return node;
}

function addChart(node) {
  const chart = new LossChart(node);
  const widget = node.addDOMWidget(WIDGET_NAME, "ltx2av_chart", chart.element, {
    serialize: false, // display only: never part of widgets_values or the prompt
    getMinHeight: () => CHART_HEIGHT,
  });
  widget.serialize = false;
  node.ltx2avChart = chart;
  liveCharts.add(chart);

  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    chart.remove();
    return onRemoved?.apply(this, arguments);
  };
  const onExecuted = node.onExecuted;
  node.onExecuted = function (output) {
    onExecuted?.apply(this, arguments);
    chart.setOutput(output);
  };
  node.setSize([Math.max(node.size[0], 420), node.size[1]]);
}

/** After a page reload a chart starts empty: show the newest finished queue of this node and run (same node
 *  id, class and run_name) from the server's history, i.e. the ui payload the node returned then. */
async function restoreFromServerHistory(chart) {
  const id = String(chart.node.id);
  const runName = chart.node.widgets?.find((w) => w.name === "run_name")?.value;
  const response = await api.fetchApi(`/history?max_items=${HISTORY_LOOKBACK}`);
  if (!response.ok) return;
  const entries = Object.values(await response.json()).reverse(); // newest first
  for (const entry of entries) {
    const queued = entry.prompt?.[2]?.[id]; // [number, prompt id, prompt, extra data, outputs]
    const output = entry.outputs?.[id];
    if (queued?.class_type === NODE_TYPE && queued.inputs?.run_name === runName && Array.isArray(output?.[HISTORY_KEY])) {
      if (chart.history.length === 0) chart.setOutput(output); // live events may have arrived meanwhile
      return;
    }
  }
}

app.registerExtension({
  name: "ltx2av.TrainChart",

  async setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      if (!detail || detail.node === undefined) return;
      const chart = nodeForExecutionId(detail.node)?.ltx2avChart;
      if (chart) chart.push(detail);
    });
  },

  async nodeCreated(node) {
    if (node.comfyClass === NODE_TYPE || node.constructor?.comfyClass === NODE_TYPE) addChart(node);
  },

  async afterConfigureGraph() {
    const empty = [...liveCharts].filter((chart) => chart.history.length === 0);
    await Promise.all(empty.map((chart) => restoreFromServerHistory(chart).catch((error) =>
      console.warn("ltx2av chart: could not read the server history", error))));
  },

  // Outputs restored without an execution (loading a finished job from the queue).
  onNodeOutputsUpdated(outputs) {
    for (const chart of liveCharts) {
      const output = outputs?.[String(chart.node.id)];
      if (Array.isArray(output?.[HISTORY_KEY])) chart.setOutput(output);
    }
  },
});
