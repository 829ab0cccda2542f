// A small, safe Markdown renderer: builds DOM nodes with textContent only (never innerHTML), so
// text from models and tools cannot inject markup. Covers what answers use: headings, paragraphs,
// lists, pipe tables, fenced code, **bold**, *em*, `code`.
"use strict";

window.renderMarkdown = (function () {
  function el(tag, text) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // Inline spans: split on `code`, **bold**, *em* / _em_; everything else is plain text.
  function inline(parent, text) {
    const re = /(`[^`]+`|\*\*[^*]+\*\*|\*[^*\s][^*]*\*|_[^_\s][^_]*_)/g;
    let last = 0, m;
    while ((m = re.exec(text)) !== null) {
      if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
      const tok = m[0];
      if (tok[0] === "`") parent.appendChild(el("code", tok.slice(1, -1)));
      else if (tok.startsWith("**")) inline(parent.appendChild(el("strong")), tok.slice(2, -2));
      else inline(parent.appendChild(el("em")), tok.slice(1, -1));
      last = m.index + tok.length;
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
    return parent;
  }

  function cells(line) {
    let s = line.trim();
    if (s.startsWith("|")) s = s.slice(1);
    if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
    return s.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
  }
  const isSep = (line) => /^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$/.test(line);

  function render(src) {
    const root = el("div");
    const lines = String(src || "").replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) { i++; continue; }
      const fence = line.match(/^\s*```/);
      if (fence) {
        const buf = [];
        i++;
        while (i < lines.length && !/^\s*```/.test(lines[i])) buf.push(lines[i++]);
        i++;
        root.appendChild(el("pre")).appendChild(el("code", buf.join("\n")));
        continue;
      }
      const h = line.match(/^(#{1,6})\s+(.*)$/);
      if (h) { root.appendChild(inline(el("h" + Math.min(6, h[1].length + 2)), h[2])); i++; continue; }
      if (line.includes("|") && i + 1 < lines.length && isSep(lines[i + 1])) {
        const table = el("table"), head = cells(line);
        const tr = table.appendChild(el("thead")).appendChild(el("tr"));
        head.forEach((c) => inline(tr.appendChild(el("th")), c));
        const body = table.appendChild(el("tbody"));
        i += 2;
        while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
          const row = body.appendChild(el("tr"));
          const cs = cells(lines[i]);
          for (let k = 0; k < head.length; k++) inline(row.appendChild(el("td")), cs[k] || "");
          i++;
        }
        root.appendChild(table);
        continue;
      }
      const li = /^\s*(?:[-*+]|\d+[.)])\s+/;
      if (li.test(line)) {
        const ordered = /^\s*\d/.test(line);
        const list = root.appendChild(el(ordered ? "ol" : "ul"));
        while (i < lines.length && li.test(lines[i])) inline(list.appendChild(el("li")), lines[i++].replace(li, ""));
        continue;
      }
      const buf = [];
      while (i < lines.length && lines[i].trim() && !/^(#{1,6})\s|^\s*```/.test(lines[i]) &&
             !(lines[i].includes("|") && i + 1 < lines.length && isSep(lines[i + 1]))) buf.push(lines[i++]);
      const p = root.appendChild(el("p"));
      buf.forEach((b, k) => { if (k) p.appendChild(el("br")); inline(p, b); });
    }
    return root;
  }
  return render;
})();
