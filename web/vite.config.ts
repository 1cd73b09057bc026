/// <reference types="vitest/config" />
import { defineConfig } from "vite";

// The dashboard is served by the tunery server: the page at /, the assets at /static/.
// `npm run build` writes straight into the Python package, which ships what it finds there.
export default defineConfig({
  base: "/static/",
  build: {
    outDir: "../src/tunery/server/static",
    emptyOutDir: true,
    assetsDir: "assets",
    target: "es2022",
    reportCompressedSize: false,
  },
  server: {
    // `npm run dev` against a `tunery serve` on the default port.
    proxy: { "/v1": "http://127.0.0.1:8000" },
  },
  test: {
    include: ["test/**/*.test.ts"],
    environment: "node",
  },
});
