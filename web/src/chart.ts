// Live line charts over training steps, drawn with uPlot (canvas; cheap to redraw every poll).

import uPlot from "uplot";
import { h } from "./dom";

export interface Line {
  label: string;
  color: string;
  /** Sparse series (validation loss): join the points and mark each one. */
  sparse?: boolean;
}

export interface Chart {
  el: HTMLElement;
  /** Redraw with [steps, ...one array per line]; the element's data-points says how many
   * non-empty points were drawn (what the browser tests wait for). */
  update(data: (number | null)[][]): void;
  destroy(): void;
}

export function lineChart(name: string, title: string, lines: Line[], format: (v: number) => string): Chart {
  const el = h("div", { class: "chart", "data-chart": name, "data-points": "0" });
  const body = h("div", { class: "chart-body" });
  const empty = h("div", { class: "chart-empty" }, "waiting for the first step…");
  el.append(h("div", { class: "chart-title" }, title), body, empty);
  let plot: uPlot | null = null;
  let data: (number | null)[][] = [[], ...lines.map(() => [])];

  const opts = (width: number): uPlot.Options => ({
    width,
    height: 190,
    legend: { show: true, live: false },
    cursor: { drag: { x: false, y: false }, points: { size: 6 } },
    scales: { x: { time: false } },
    axes: [
      { stroke: "#6b7280", grid: { stroke: "#eef0f3" }, ticks: { stroke: "#e5e7eb" }, label: "step", labelSize: 18, labelGap: 0, size: 34 },
      {
        stroke: "#6b7280",
        grid: { stroke: "#eef0f3" },
        ticks: { stroke: "#e5e7eb" },
        size: 58,
        values: (_u, splits) => splits.map((v) => (v === null ? "" : format(v))),
      },
    ],
    series: [
      { label: "step" },
      ...lines.map((line) => ({
        label: line.label,
        stroke: line.color,
        width: 2,
        spanGaps: true,
        value: (_u: uPlot, v: number | null) => (v === null ? "–" : format(v)),
        points: { show: line.sparse ? true : (u: uPlot) => u.data[0].length < 40, size: line.sparse ? 7 : 5, fill: line.color },
      })),
    ],
  });

  const width = () => Math.max(220, Math.floor(body.clientWidth || el.clientWidth || 320));
  const draw = () => {
    const points = data.slice(1).reduce((n, ys) => n + ys.filter((y) => y !== null).length, 0);
    el.dataset.points = String(points);
    empty.hidden = points > 0;
    if (!el.isConnected) return;
    if (plot === null) plot = new uPlot(opts(width()), data as uPlot.AlignedData, body);
    else plot.setData(data as uPlot.AlignedData);
  };
  const resize = new ResizeObserver(() => {
    if (plot && Math.abs(plot.width - width()) > 4) plot.setSize({ width: width(), height: 190 });
    else if (!plot) draw();
  });
  resize.observe(body);

  return {
    el,
    update(next) {
      data = next;
      draw();
    },
    destroy() {
      resize.disconnect();
      plot?.destroy();
    },
  };
}
