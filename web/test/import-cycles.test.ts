import { describe, expect, it } from "vitest";

// No import circles between the dashboard's modules: each module may import only modules below it
// (main → views → widgets/chart/format → api/dom → sse). Type-only imports count too: a circle of
// types is still a circle in the code's layering, and madge reports it the same way.

/** The source of every TS module under src/, keyed "src/…/x.ts" (read by Vite, so no Node types). */
const SOURCES: Record<string, string> = Object.fromEntries(
  Object.entries(import.meta.glob<string>("../src/**/*.ts", { query: "?raw", import: "default", eager: true })).map(
    ([key, text]) => [key.replace(/^\.\.\//, ""), text],
  ),
);

/** Import and re-export statements (`import … from "x"`, `import type …`, `import "x"`,
 * `export … from "x"`), and dynamic `import("x")`. Comments are dropped first. */
const STATIC = /^\s*(?:import|export)\s+(?:type\s+)?(?:[\w$*{}\s,]+?\s+from\s+)?["']([^"']+)["']/gm;
const DYNAMIC = /\bimport\s*\(\s*["']([^"']+)["']\s*\)/g;
const ASSET = /\.(css|svg|png|jpe?g|gif|webp|json|txt)(\?.*)?$/;

function specifiers(source: string): string[] {
  const code = source.replace(/^\s*\/\*[\s\S]*?\*\//gm, "").replace(/^\s*\/\/.*$/gm, "");
  return [...code.matchAll(STATIC), ...code.matchAll(DYNAMIC)].map((m) => m[1]);
}

function normalize(path: string): string {
  const out: string[] = [];
  for (const part of path.split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") out.pop();
    else out.push(part);
  }
  return out.join("/");
}

/** Module → the modules it imports (relative imports only: packages cannot import us back). */
export function importGraph(sources: Record<string, string>): Map<string, string[]> {
  const graph = new Map<string, string[]>();
  for (const [file, text] of Object.entries(sources)) {
    const dir = file.split("/").slice(0, -1).join("/");
    const targets: string[] = [];
    for (const spec of specifiers(text)) {
      if (!spec.startsWith(".") || ASSET.test(spec)) continue;
      const base = normalize(`${dir}/${spec}`);
      const found = [base, `${base}.ts`, `${base}/index.ts`].find((c) => c.endsWith(".ts") && c in sources);
      if (!found) throw new Error(`${file}: cannot resolve import "${spec}"`);
      if (!targets.includes(found)) targets.push(found);
    }
    graph.set(file, targets);
  }
  return graph;
}

/** Every circle a depth-first walk meets, each as "a.ts > b.ts > a.ts". */
export function findCycles(graph: Map<string, string[]>): string[] {
  const state = new Map<string, "open" | "done">();
  const stack: string[] = [];
  const cycles: string[] = [];
  const visit = (node: string) => {
    state.set(node, "open");
    stack.push(node);
    for (const next of graph.get(node) ?? []) {
      if (state.get(next) === "open") cycles.push([...stack.slice(stack.indexOf(next)), next].join(" > "));
      else if (!state.has(next)) visit(next);
    }
    stack.pop();
    state.set(node, "done");
  };
  for (const node of [...graph.keys()].sort()) if (!state.has(node)) visit(node);
  return cycles;
}

describe("import circles", () => {
  it("finds a circle, type-only or not, and none without one", () => {
    const circle = {
      "src/main.ts": 'import { a } from "./views/a";\nexport interface View { el: HTMLElement }',
      "src/views/a.ts": 'import { b } from "./b";\nexport const a = b;',
      "src/views/b.ts": 'import type { View } from "../main";\nexport const b = 1;',
    };
    expect(findCycles(importGraph(circle))).toEqual(["src/main.ts > src/views/a.ts > src/views/b.ts > src/main.ts"]);
    const reexport = { "src/x.ts": 'export { y } from "./y";', "src/y.ts": "import {\n  x,\n} from './x';" };
    expect(findCycles(importGraph(reexport))).toHaveLength(1);
    const commented = { "src/x.ts": '// import { y } from "./y";\nexport const x = 1;', "src/y.ts": 'import { x } from "./x";' };
    expect(findCycles(importGraph(commented))).toEqual([]);
  });

  it("has none in web/src", () => {
    const graph = importGraph(SOURCES);
    // The walk saw the real tree (a broken glob or parser would pass vacuously otherwise).
    expect(graph.get("src/main.ts")).toEqual(expect.arrayContaining(["src/api.ts", "src/dom.ts", "src/views/trainings.ts"]));
    expect(graph.get("src/api.ts")).toContain("src/sse.ts");
    expect(findCycles(graph)).toEqual([]);
  });
});
