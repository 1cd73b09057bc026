import { describe, expect, it } from "vitest";
import { SseParser } from "../src/sse";

describe("SseParser", () => {
  it("parses tunery's prediction stream, split anywhere", () => {
    const wire = "event: output\nid: 1\ndata:  Hello\n\n: keepalive\n\nevent: output\nid: 2\ndata: a\ndata: b\n\nevent: done\nid: 3\ndata: {}\n\n";
    for (const size of [1, 3, 7, wire.length]) {
      const parser = new SseParser();
      const events = [];
      for (let i = 0; i < wire.length; i += size) events.push(...parser.feed(wire.slice(i, i + size)));
      expect(events).toEqual([
        { event: "output", id: "1", data: " Hello" },
        { event: "output", id: "2", data: "a\nb" },
        { event: "done", id: "3", data: "{}" },
      ]);
    }
  });

  it("accepts CRLF and CR line endings", () => {
    const parser = new SseParser();
    expect(parser.feed("data: x\r\n\r\ndata: y\r\rdata: z\n\n")).toEqual([
      { event: "message", id: "", data: "x" },
      { event: "message", id: "", data: "y" },
      { event: "message", id: "", data: "z" },
    ]);
  });
});
