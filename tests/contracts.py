"""Import-linter contract types the built-in ones lack (used from ``[tool.importlinter]`` in
pyproject.toml, checked by ``lint-imports`` in tests/run.sh).

* ``stdlib_only``: a package imports the standard library only (the agent, which ships as a
  zipapp to a node's own Python 3.9). ``forbidden`` would need every third-party package named,
  and the next dependency added to pyproject.toml would slip through; this asks the import graph
  instead. The graph must be built with ``include_external_packages`` (then the standard
  library's modules are in it, squashed to their top-level names).
* ``independent_by_name``: the modules of some packages whose names match a pattern import none
  of each other, directly or not (test modules: shared helpers live in helper modules). The
  built-in ``independence`` takes wildcards only for whole module names.
"""

from __future__ import annotations

import fnmatch
import sys

from grimp import ImportGraph
from importlinter import Contract, ContractCheck, fields, output

__all__ = ["IndependentByNameContract", "StdlibOnlyContract"]


class StdlibOnlyContract(Contract):
    """``source_modules`` (and their descendants) import each other and the standard library,
    nothing else: no third-party package, no other package of the project."""

    type_name = "stdlib_only"

    source_modules = fields.ListField(subfield=fields.ModuleField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        sources: set[str] = set()
        for module in self.source_modules:  # type: ignore[attr-defined]
            sources |= {module.name, *graph.find_descendants(module.name)}
        illegal = []
        for importer in sorted(sources):
            for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                if imported in sources or imported.split(".")[0] in sys.stdlib_module_names:
                    continue
                lines = graph.get_import_details(importer=importer, imported=imported)
                illegal.append(
                    {
                        "importer": importer,
                        "imported": imported,
                        "line_numbers": [detail["line_number"] for detail in lines],
                    }
                )
        return ContractCheck(kept=not illegal, metadata={"illegal": illegal})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for entry in check.metadata["illegal"]:
            where = ", ".join(f"l.{number}" for number in entry["line_numbers"]) or "?"
            output.print_error(
                f"{entry['importer']} imports {entry['imported']} ({where}), which is not in the "
                "standard library",
                bold=False,
            )
            output.new_line()


class IndependentByNameContract(Contract):
    """The children of ``containers`` whose last name part matches ``pattern`` (fnmatch) import
    none of each other, directly or through other modules."""

    type_name = "independent_by_name"

    containers = fields.ListField(subfield=fields.ModuleField())
    pattern = fields.StringField()

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        pattern = str(self.pattern)  # type: ignore[attr-defined]
        members = sorted(
            child
            for container in self.containers  # type: ignore[attr-defined]
            for child in graph.find_children(container.name)
            if fnmatch.fnmatchcase(child.rpartition(".")[2], pattern)
        )
        illegal = []
        for importer in members:
            for imported in members:
                if importer == imported:
                    continue
                chain = graph.find_shortest_chain(importer=importer, imported=imported)
                if chain is not None:
                    illegal.append({"chain": list(chain)})
        return ContractCheck(kept=not illegal, metadata={"illegal": illegal})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for entry in check.metadata["illegal"]:
            chain = entry["chain"]
            output.print_error(f"{chain[0]} imports {chain[-1]}: {' -> '.join(chain)}", bold=False)
            output.new_line()
