"""pw.x parser that closes the gaps of aiida-quantumespresso 5.1 for polarization work (wraps, does not fork).

What `PwParser` misses and `PolPwParser` adds to `output_parameters`:

- `band_edges`: highest occupied / lowest unoccupied level in eV (the metal check needs both; the stock parser
  keeps neither for fixed occupations). From stdout, or from the XML when stdout has none: an scf that did not
  converge (a metal with fixed occupations, typically) prints no band energies but writes both levels to its XML.
- `berry_phase` (nscf with `lberry`): the cell dipole contribution along lattice vector `gdir` and its quantum,
  as Cartesian vectors in e·Å (the stock parser keeps the phase and a polarization in C/m² without the lattice
  vector it refers to).
- `finite_field` (scf with `lelfield`): the electronic + ionic cell dipole in e·Å, Cartesian, and the applied
  field in V/Å (the stock parser keeps them only in `output_trajectory`, raw, in Ry a.u.).
- QE 6.7 writes an empty `<electric_field/>` in the XML of an scf run with `lberry`, which makes the stock XML
  parser raise (exit 350); the element carries no data, so it is dropped before parsing.

Conventions (checked against pw.x itself, see tests/test_pw_parser.py):
- pw.x's Berry phase along `gdir` is the cell dipole's coefficient on lattice vector a_gdir: d = Σ_g φ_g a_g with φ
  the total phase in units of 2π, and the quantum along a_g is m·a_g with m the `(mod m)` pw.x prints.
- pw.x's "Dipole on Cartesian axes" under `lelfield` is Cartesian in any cell (electronic part: Σ_j el_pol(j) â_j
  with el_pol(j) = φ_j |a_j|; ionic part: Σ_i Z_i r_i), in Ry a.u., and its enthalpy is E_0 − ε·d in the same units.
"""
import io
import re

import numpy as np
from aiida_quantumespresso.parsers.pw import PwParser

from polmodel.data import units

__all__ = (
    "PolPwParser",
    "parse_band_edges",
    "parse_band_edges_xml",
    "parse_finite_field_dipoles",
    "parse_berry_phase_xml",
    "berry_phase_dipole",
    "efield_from_parameters",
    "strip_empty_electric_field",
)

HARTREE_EV = units.HARTREE_EV  # pw.x's XML is in Hartree atomic units
_FLOAT = r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eEdD][-+]?\d+)?"
_BAND_EDGES = re.compile(rf"highest occupied, lowest unoccupied level \(ev\):\s+({_FLOAT})\s+({_FLOAT})")
_HIGHEST_ONLY = re.compile(rf"highest occupied level \(ev\):\s+({_FLOAT})")
_DIPOLE_BLOCK = r"{kind} Dipole on Cartesian axes\s*\n\s*1\s+({f})\s*\n\s*2\s+({f})\s*\n\s*3\s+({f})"
_ELECTRONIC_DIPOLE = re.compile(_DIPOLE_BLOCK.format(kind="Electronic", f=_FLOAT))
_IONIC_DIPOLE = re.compile(_DIPOLE_BLOCK.format(kind="Ionic", f=_FLOAT))
_EMPTY_ELECTRIC_FIELD = re.compile(rb"<electric_field\s*/>|<electric_field>\s*</electric_field>")


def _to_float(text):
    return float(text.replace("D", "E").replace("d", "e"))


def parse_band_edges(stdout):
    """Return {'highest_occupied_level', 'lowest_unoccupied_level'} in eV from pw.x's stdout (last SCF step).

    `lowest_unoccupied_level` is None when pw.x computed no empty band (nbnd equal to the occupied bands);
    None overall when pw.x printed neither (smearing runs print a Fermi energy instead).
    """
    edges = _BAND_EDGES.findall(stdout)
    if edges:
        homo, lumo = edges[-1]
        return {"highest_occupied_level": _to_float(homo), "lowest_unoccupied_level": _to_float(lumo)}
    highest = _HIGHEST_ONLY.findall(stdout)
    if highest:
        return {"highest_occupied_level": _to_float(highest[-1]), "lowest_unoccupied_level": None}
    return None


def parse_band_edges_xml(xml_bytes):
    """Return {'highest_occupied_level', 'lowest_unoccupied_level'} in eV from a pw.x XML output, or None.

    pw.x writes `highestOccupiedLevel` (and `lowestUnoccupiedLevel` when there are empty bands) in Hartree under
    `output/band_structure` for fixed occupations, whether or not the scf converged.
    """
    from xml.etree import ElementTree

    root = ElementTree.parse(io.BytesIO(xml_bytes)).getroot()
    bands = root.find("./output/band_structure")
    highest = bands.find("highestOccupiedLevel") if bands is not None else None
    if highest is None:
        return None
    lowest = bands.find("lowestUnoccupiedLevel")
    return {
        "highest_occupied_level": _to_float(highest.text) * HARTREE_EV,
        "lowest_unoccupied_level": _to_float(lowest.text) * HARTREE_EV if lowest is not None else None,
    }


def parse_finite_field_dipoles(stdout):
    """Return the last electronic and ionic cell dipoles pw.x printed under `lelfield`, or None if absent.

    Keys: `electronic_dipole_ry`, `ionic_dipole_ry` (raw, Ry a.u., Cartesian) and `dipole` (their sum in e·Å).
    """
    electronic = _ELECTRONIC_DIPOLE.findall(stdout)
    ionic = _IONIC_DIPOLE.findall(stdout)
    if not electronic or not ionic:
        return None
    electronic = np.array([_to_float(x) for x in electronic[-1]])
    ionic = np.array([_to_float(x) for x in ionic[-1]])
    return {
        "electronic_dipole_ry": electronic.tolist(),
        "ionic_dipole_ry": ionic.tolist(),
        "dipole": units.dipole_ry_to_e_angstrom(electronic + ionic).tolist(),
    }


def efield_from_parameters(parameters):
    """The homogeneous field (3,) in V/Å of a pw.x input-parameters dict (`ELECTRONS.efield_cart`, Ry a.u.)."""
    efield = parameters.get("ELECTRONS", {}).get("efield_cart", [0.0, 0.0, 0.0])
    return units.field_ry_to_v_per_angstrom(np.asarray(efield, dtype=float)).tolist()


def strip_empty_electric_field(xml_bytes):
    """Drop the data-less `<electric_field/>` that QE 6.7 writes in the output of an scf with `lberry`."""
    return _EMPTY_ELECTRIC_FIELD.sub(b"", xml_bytes)


def parse_berry_phase_xml(xml_bytes):
    """Return the Berry-phase summary of a pw.x XML output, or None if it holds none.

    Keys: `total_phase`, `ionic_phase`, `electronic_phase` (units of 2π), `phase_modulus` (the m of pw.x's
    `(mod m)`: 1 when an ion has an odd valence charge, 2 for a spin-degenerate cell otherwise), `direction`
    (unit vector of the lattice vector the phase refers to).
    """
    from xml.etree import ElementTree

    root = ElementTree.parse(io.BytesIO(xml_bytes)).getroot()
    berry = root.find("./output/electric_field/BerryPhase")
    if berry is None:
        return None
    total = berry.find("totalPhase")
    modulus = re.search(rf"({_FLOAT})", total.get("modulus", ""))
    if modulus is None:
        raise ValueError(f"cannot read the phase modulus {total.get('modulus')!r} of the Berry phase")
    direction = berry.find("totalPolarization/direction")
    return {
        "total_phase": _to_float(total.text),
        "ionic_phase": _to_float(total.get("ionic")),
        "electronic_phase": _to_float(total.get("electronic")),
        "phase_modulus": _to_float(modulus.group(1)),
        "direction": [_to_float(x) for x in direction.text.split()] if direction is not None else None,
    }


def berry_phase_dipole(total_phase, phase_modulus, cell, gdir):
    """Cell-dipole contribution (3,) and its quantum (3,) in e·Å of a Berry phase along lattice vector `gdir`.

    `cell` (3, 3) Å with lattice vectors as rows, `gdir` 1-based as in pw.x. The three contributions of
    gdir = 1, 2, 3 sum to the Cartesian cell dipole; the quanta are the rows of `polarization_quantum`.
    """
    if gdir not in (1, 2, 3):
        raise ValueError(f"gdir must be 1, 2 or 3, got {gdir!r}")
    lattice_vector = np.asarray(cell, dtype=float)[gdir - 1]
    return total_phase * lattice_vector, phase_modulus * lattice_vector


class PolPwParser(PwParser):
    """`PwParser` plus band edges, Berry-phase dipoles and finite-field dipoles in project units (e·Å, V/Å)."""

    def _xml_content(self):
        names = self.retrieved.base.repository.list_object_names()
        xml_names = [name for name in self.node.process_class.xml_filenames if name in names]
        if len(xml_names) != 1:
            return None
        return self.retrieved.base.repository.get_object_content(xml_names[0], mode="rb")

    def _stdout_content(self):
        filename = self.node.base.attributes.get("output_filename")
        if filename not in self.retrieved.base.repository.list_object_names():
            return ""
        return self.retrieved.base.repository.get_object_content(filename, mode="r")

    def parse_xml(self):
        """Parse the XML as `PwParser` does, after dropping QE 6.7's empty `<electric_field/>`."""
        content = self._xml_content()
        if content is None or not _EMPTY_ELECTRIC_FIELD.search(content):
            return super().parse_xml()

        from aiida_quantumespresso.parsers.parse_xml.parse import parse_xml
        from aiida_quantumespresso.utils.mapping import get_logging_container

        try:
            return parse_xml(io.BytesIO(strip_empty_electric_field(content)))
        except Exception as exception:  # the stock parser maps every failure onto this exit code too
            self.exit_code_xml = self.exit_codes.ERROR_UNEXPECTED_PARSER_EXCEPTION.format(exception=exception)
            return {}, get_logging_container()

    def build_output_parameters(self, parsed_stdout, parsed_xml):
        parameters = super().build_output_parameters(parsed_stdout, parsed_xml)
        stdout = self._stdout_content()
        input_parameters = self.node.inputs.parameters.get_dict()
        control = input_parameters.get("CONTROL", {})

        band_edges = parse_band_edges(stdout)
        if band_edges is None or band_edges["lowest_unoccupied_level"] is None:
            content = self._xml_content()
            from_xml = parse_band_edges_xml(strip_empty_electric_field(content)) if content is not None else None
            band_edges = from_xml if from_xml is not None else band_edges
        if band_edges is not None:
            parameters["band_edges"] = band_edges

        if control.get("lelfield", False):
            dipoles = parse_finite_field_dipoles(stdout)
            if dipoles is not None:
                dipoles["efield"] = efield_from_parameters(input_parameters)
                parameters["finite_field"] = dipoles

        if control.get("lberry", False):
            content = self._xml_content()
            berry = parse_berry_phase_xml(content) if content is not None else None
            if berry is not None:
                gdir = int(control.get("gdir"))
                cell = np.array(self.node.inputs.structure.cell)
                dipole, quantum = berry_phase_dipole(berry["total_phase"], berry["phase_modulus"], cell, gdir)
                berry.update({"gdir": gdir, "dipole": dipole.tolist(), "quantum": quantum.tolist()})
                parameters["berry_phase"] = berry
        return parameters
