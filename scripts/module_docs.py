"""Write docs/modules/<module>.md from ansible-doc's JSON, so the published
module documentation is the modules' own DOCUMENTATION, EXAMPLES and RETURN.
A system test regenerates the pages and fails when docs/modules differs.
Run it through scripts/update_docs.sh, which stages the collection where
ansible-doc finds it."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("backstore", "snapper_cache", "snapper_cache_info", "live_iso")
# Ansible's documentation markup: C(code), V(value), O(option), RV(return value),
# M(module), I(italic), B(bold), U(url), L(text,url), E(env), P(plugin).
MARKUP = re.compile(r"\b(C|V|O|RV|M|I|B|U|E|P|L)\(([^()]*)\)")


def plain(text):
    def replace(match):
        kind, value = match.groups()
        if kind in ("I",):
            return "*%s*" % value
        if kind == "B":
            return "**%s**" % value
        if kind == "U":
            return "<%s>" % value
        if kind == "L":
            label, url = value.split(",", 1)
            return "[%s](%s)" % (label.strip(), url.strip())
        return "`%s`" % value
    return MARKUP.sub(replace, text)


def paragraphs(value):
    if value is None:
        return []
    return [plain(item) for item in (value if isinstance(value, list) else [value])]


def cell(value):
    return " ".join(paragraphs(value)).replace("|", "\\|").replace("\n", " ")


def literal(value):
    return "" if value is None else "`%s`" % json.dumps(value)


def option_rows(options, prefix=""):
    for name in sorted(options):
        spec = options[name]
        required = "yes" if spec.get("required") else ""
        choices = ", ".join("`%s`" % choice for choice in spec.get("choices", []))
        kind = spec.get("type", "str") + (" of %s" % spec["elements"] if spec.get("elements") else "")
        row = (prefix + name, kind, required, literal(spec.get("default")), choices, cell(spec.get("description")))
        yield "| `%s` | %s | %s | %s | %s | %s |" % row
        if spec.get("suboptions"):
            yield from option_rows(spec["suboptions"], prefix + name + ".")


def return_rows(returns, prefix=""):
    for name in sorted(returns):
        spec = returns[name]
        row = (prefix + name, spec.get("type", ""), cell(spec.get("returned")), cell(spec.get("description")))
        yield "| `%s` | %s | %s | %s |" % row
        if spec.get("contains"):
            yield from return_rows(spec["contains"], prefix + name + ".")


def page(name, doc):
    documentation = doc["doc"]
    lines = ["# liveclone.core.%s" % name, "",
             "<!-- Made by scripts/module_docs.py from the module's documentation; do not edit. -->", "",
             plain(documentation["short_description"]), ""]
    for paragraph in paragraphs(documentation.get("description")):
        lines += [paragraph, ""]
    if documentation.get("requirements"):
        lines += ["## Requirements", ""] + ["- %s" % plain(item) for item in documentation["requirements"]] + [""]
    lines += ["## Options", "", "| option | type | required | default | choices | description |",
              "|---|---|---|---|---|---|", *option_rows(documentation.get("options", {})), ""]
    attributes = documentation.get("attributes") or {}
    if attributes:
        lines += ["## Attributes", "", "| attribute | support | description |", "|---|---|---|"]
        lines += ["| %s | %s | %s |" % (key, spec.get("support", ""), cell(spec.get("description")))
                  for key, spec in sorted(attributes.items())] + [""]
    if documentation.get("notes"):
        lines += ["## Notes", ""] + ["- %s" % plain(note) for note in documentation["notes"]] + [""]
    if doc.get("examples"):
        lines += ["## Examples", "", "```yaml", doc["examples"].strip("\n"), "```", ""]
    if doc.get("return"):
        lines += ["## Return values", "", "| key | type | returned | description |", "|---|---|---|---|",
                  *return_rows(doc["return"]), ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "docs/modules"))
    args = parser.parse_args()
    names = ["liveclone.core.%s" % name for name in MODULES]
    ansible_doc = os.path.join(os.path.dirname(sys.executable), "ansible-doc")
    docs = json.loads(subprocess.run([ansible_doc, "--json", "--type", "module", *names], check=True,
                                     capture_output=True, text=True).stdout)
    os.makedirs(args.out, exist_ok=True)
    for name in MODULES:
        with open(os.path.join(args.out, "%s.md" % name), "w") as handle:
            handle.write(page(name, docs["liveclone.core.%s" % name]))


if __name__ == "__main__":
    main()
