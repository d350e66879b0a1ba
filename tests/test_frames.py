"""Labelled-frame files, the polarization fold, and the analytic toy potential the training tests rely on."""
import numpy as np
import pytest
import torch
from ase import Atoms

from polmodel.data.frames import (FrameError, frame_born_charges, frame_dipole, frame_efield, frame_energy,
                                  frame_forces, frame_polarizability, frame_polarization_quantum, frame_source,
                                  frame_stress, normalize_frame, read_frames, write_frames)
from polmodel.data.polarization import fold_dipole_difference
from toy_potential import make_toy_frames, reference_crystal, toy_labels


@pytest.fixture(scope="module")
def toy_frames():
    return make_toy_frames(3, seed=7)


# --- frames files --------------------------------------------------------------------------------------------
def test_round_trip_keeps_every_label_and_absent_stays_absent(tmp_path, toy_frames):
    path = tmp_path / "frames.xyz"
    write_frames(path, toy_frames)
    read = read_frames(path)
    assert len(read) == len(toy_frames)
    for original, frame in zip(toy_frames, read):
        assert frame.calc is None
        assert frame.get_chemical_symbols() == original.get_chemical_symbols()
        np.testing.assert_allclose(frame.positions, original.positions, atol=1e-7)
        np.testing.assert_allclose(frame.cell.array, original.cell.array, atol=1e-7)
        assert frame_energy(frame) == pytest.approx(original.info["energy"], abs=1e-9)
        np.testing.assert_allclose(frame_efield(frame), original.info["efield"])
        np.testing.assert_allclose(frame_forces(frame), original.arrays["forces"], atol=1e-7)
        np.testing.assert_allclose(frame_dipole(frame), original.info["dipole"], atol=1e-9)
        np.testing.assert_allclose(frame_polarization_quantum(frame), original.info["polarization_quantum"])
        assert frame_source(frame) == original.info["source"]
        for accessor, key in ((frame_stress, "stress"), (frame_polarizability, "polarizability")):
            if key in original.info:
                np.testing.assert_allclose(accessor(frame), original.info[key], atol=1e-9)
            else:
                assert accessor(frame) is None and key not in frame.info
        if "born_effective_charges" in original.arrays:
            np.testing.assert_allclose(frame_born_charges(frame),
                                       original.arrays["born_effective_charges"].reshape(-1, 3, 3), atol=1e-7)
        else:
            assert frame_born_charges(frame) is None
    # the toy set has finite-field frames without stress and zero-field frames without Z*: both cases ran
    assert any("stress" not in f.info for f in read) and any("stress" in f.info for f in read)


def test_stress_keeps_its_off_diagonal_orientation(tmp_path):
    atoms = reference_crystal()
    stress = np.array([[1.0, 0.2, 0.3], [0.2, 2.0, 0.4], [0.3, 0.4, 3.0]])
    atoms.info.update(energy=-1.0, stress=stress)
    write_frames(tmp_path / "s.xyz", [atoms])
    np.testing.assert_allclose(frame_stress(read_frames(tmp_path / "s.xyz")[0]), stress)


@pytest.mark.parametrize("key, value, message", [
    ("stress", np.zeros((2, 2)), "'stress' has shape"),
    ("dipole", np.zeros(4), "'dipole' has shape"),
    ("energy", float("nan"), "'energy' contains NaN"),
    ("polarization_quantum", np.zeros((3, 3)), "singular"),
    ("efield", "strong", "not numeric"),
])
def test_bad_info_labels_are_rejected_with_the_label_name(key, value, message):
    atoms = reference_crystal()
    atoms.info[key] = value
    with pytest.raises(FrameError, match=message):
        normalize_frame(atoms, index=3)


def test_bad_array_labels_are_rejected():
    atoms = reference_crystal()
    atoms.arrays["forces"] = np.full((2, 3), np.nan)
    with pytest.raises(FrameError, match="frame 0: label 'forces' contains NaN"):
        normalize_frame(atoms, index=0)
    atoms = reference_crystal()
    atoms.arrays["born_effective_charges"] = np.zeros((2, 4))
    with pytest.raises(FrameError, match="'born_effective_charges' has shape"):
        normalize_frame(atoms)


def test_stress_on_an_open_frame_is_rejected():
    atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    atoms.info["stress"] = np.eye(3)
    with pytest.raises(FrameError, match="not periodic"):
        normalize_frame(atoms)


def test_corrupt_missing_and_empty_files(tmp_path):
    with pytest.raises(FrameError, match="does not exist"):
        read_frames(tmp_path / "nothing.xyz")
    (tmp_path / "empty.xyz").write_text("\n")
    with pytest.raises(FrameError, match="empty"):
        read_frames(tmp_path / "empty.xyz")
    (tmp_path / "corrupt.xyz").write_text("2\nProperties=species:S:1:pos:R:3\nNa 0 0 0\n")
    with pytest.raises(FrameError, match="not valid extended XYZ"):
        read_frames(tmp_path / "corrupt.xyz")
    (tmp_path / "nopos.xyz").write_text('1\nProperties=species:S:1:forces:R:3 pbc="F F F"\nNa 0 0 0\n')
    with pytest.raises(FrameError):
        read_frames(tmp_path / "nopos.xyz")
    (tmp_path / "nan.xyz").write_text('1\nProperties=species:S:1:pos:R:3 pbc="F F F"\nNa nan 0 0\n')
    with pytest.raises(FrameError, match="positions contain NaN"):
        read_frames(tmp_path / "nan.xyz")


# --- polarization fold ---------------------------------------------------------------------------------------
def test_fold_is_invariant_under_quantum_shifts_and_not_under_other_shifts():
    rng = np.random.default_rng(0)
    quantum = 2.0 * reference_crystal().cell.array @ (np.eye(3) + 0.02 * rng.standard_normal((3, 3)))
    delta = 0.2 * rng.standard_normal((5, 3))
    folded = fold_dipole_difference(delta, quantum)
    shifted = fold_dipole_difference(delta + rng.integers(-3, 4, size=(5, 3)) @ quantum, quantum)
    np.testing.assert_allclose(shifted, folded, atol=1e-12)
    np.testing.assert_allclose(folded, delta, atol=1e-12)  # small differences are already minimal
    moved = fold_dipole_difference(delta + 0.3 * quantum[0], quantum)
    assert np.abs(moved - folded).max() > 0.1
    # the result is inside the quantum cell around zero
    fractional = np.linalg.solve(quantum.T, fold_dipole_difference(delta + 0.7 * quantum[1], quantum).T).T
    assert np.all(np.abs(fractional) <= 0.5 + 1e-12)


def test_fold_torch_matches_numpy_and_passes_gradients():
    rng = np.random.default_rng(1)
    quantum = rng.standard_normal((4, 3, 3)) + 4 * np.eye(3)
    delta = 3 * rng.standard_normal((4, 3))
    delta_torch = torch.tensor(delta, requires_grad=True)
    folded = fold_dipole_difference(delta_torch, torch.tensor(quantum))
    np.testing.assert_allclose(folded.detach().numpy(), fold_dipole_difference(delta, quantum), atol=1e-12)
    folded.pow(2).sum().backward()
    np.testing.assert_allclose(delta_torch.grad.numpy(), 2 * folded.detach().numpy(), atol=1e-12)


# --- toy potential -------------------------------------------------------------------------------------------
def _finite_difference(function, x, step):
    x = np.array(x, dtype=float)
    derivative = []
    for index in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += step
        minus[index] -= step
        derivative.append((np.asarray(function(plus)) - np.asarray(function(minus))) / (2 * step))
    return np.array(derivative)  # [input component, *output shape]


@pytest.mark.parametrize("efield", [(0.0, 0.0, 0.0), (0.15, -0.1, 0.05)])
def test_toy_derivatives_equal_finite_differences(efield):
    rng = np.random.default_rng(3)
    reference = reference_crystal((2, 1, 1))
    sites = reference.get_scaled_positions()
    atoms = reference.copy()
    atoms.positions += 0.15 * rng.standard_normal(atoms.positions.shape)
    exact = toy_labels(atoms, sites, efield)

    def at_positions(flat):
        moved = atoms.copy()
        moved.positions = flat.reshape(-1, 3)
        return toy_labels(moved, sites, efield)

    def at_field(vector):
        return toy_labels(atoms, sites, vector)

    step = 1e-5
    forces = -_finite_difference(lambda x: at_positions(x)["energy"], atoms.positions.ravel(), step)
    np.testing.assert_allclose(exact["forces"].ravel(), forces, atol=1e-8)
    dipole = -_finite_difference(lambda e: at_field(e)["energy"], efield, step)
    np.testing.assert_allclose(exact["dipole"], dipole, atol=1e-8)
    born = _finite_difference(lambda e: at_field(e)["forces"], efield, step)  # [a, i, b] = ∂F_ib/∂ε_a
    np.testing.assert_allclose(exact["born_effective_charges"], born.transpose(1, 0, 2), atol=1e-8)
    np.testing.assert_allclose(exact["born_effective_charges"].sum(0), 0.0, atol=1e-12)
    polarizability = _finite_difference(lambda e: at_field(e)["dipole"], efield, step)  # [b, a]
    np.testing.assert_allclose(exact["polarizability"], polarizability.T, atol=1e-8)
    np.testing.assert_allclose(exact["polarizability"], exact["polarizability"].T, atol=1e-12)
    # Z* is geometry dependent (not the bare charges), so a model has something to learn
    assert np.abs(exact["born_effective_charges"][0] - np.eye(3)).max() > 1e-2

    def at_strain(flat):
        strain = flat.reshape(3, 3)
        strained = atoms.copy()
        strained.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
        return toy_labels(strained, sites, efield)["energy"]

    if not any(efield):  # stress is a zero-field label
        stress = _finite_difference(at_strain, np.zeros(9), step).reshape(3, 3) / atoms.get_volume()
        np.testing.assert_allclose(exact["stress"], 0.5 * (stress + stress.T), atol=1e-9)


def test_toy_frames_carry_branch_shifted_dipoles_consistent_modulo_the_quantum():
    frames = make_toy_frames(6, seed=11, branch_shift_fraction=0.5)
    sites = reference_crystal().get_scaled_positions()
    shifted = 0
    for frame in frames:
        exact = toy_labels(frame, sites, frame.info["efield"])
        difference = frame.info["dipole"] - exact["dipole"]
        # as pw.x's lelfield enthalpy: -ε·ΩP on the branch the dipole is reported on
        np.testing.assert_allclose(frame.info["energy"], exact["energy"] - frame.info["efield"] @ difference)
        quantum = frame.info["polarization_quantum"]
        np.testing.assert_allclose(quantum, 2.0 * frame.cell.array)
        np.testing.assert_allclose(fold_dipole_difference(difference, quantum), 0.0, atol=1e-9)
        shifted += np.abs(difference).max() > 1.0
    assert shifted >= 2
    assert any(np.any(frame.info["efield"]) for frame in frames)


# --- branch continuity -------------------------------------------------------------------------------------------
def test_frames_of_one_structure_are_put_on_the_branch_of_its_zero_field_frame():
    from polmodel.data.frames import align_dipole_branches, structure_key

    shifted = make_toy_frames(3, seed=8, branch_shift_fraction=1.0)  # every frame reported on some other branch
    sites = reference_crystal().get_scaled_positions()
    exact = [toy_labels(frame, sites, frame.info["efield"])["dipole"] for frame in shifted]
    aligned = align_dipole_branches(shifted)
    groups = {}
    for index, frame in enumerate(aligned):
        groups.setdefault(structure_key(frame), []).append(index)
    assert len(groups) == 3 and len({aligned[g[0]].info["dipole_branch"] for g in groups.values()}) == 3
    for indices in groups.values():
        reference = indices[0]  # the zero-field frame comes first
        assert not np.any(aligned[reference].info["efield"])
        np.testing.assert_array_equal(aligned[reference].info["dipole"], shifted[reference].info["dipole"])
        for index in indices:
            assert aligned[index].info["dipole_branch"] == aligned[reference].info["dipole_branch"]
            # on one branch: the differences are the true (tiny) field responses, no quanta in between
            np.testing.assert_allclose(aligned[index].info["dipole"] - aligned[reference].info["dipole"],
                                       exact[index] - exact[reference], atol=1e-9)
            # the enthalpy moved with the dipole: E + ε·ΩP is branch independent
            efield = aligned[index].info["efield"]
            np.testing.assert_allclose(aligned[index].info["energy"] + efield @ aligned[index].info["dipole"],
                                       shifted[index].info["energy"] + efield @ shifted[index].info["dipole"],
                                       atol=1e-9)
    # the input frames are not modified
    assert all("dipole_branch" not in frame.info for frame in shifted)


def test_structures_of_one_trajectory_are_chained_onto_one_branch():
    from polmodel.data.frames import align_dipole_branches

    frames = make_toy_frames(3, seed=9, fields=(), branch_shift_fraction=0.0)
    exact = [frame.info["dipole"].copy() for frame in frames]
    for index, (frame, integers) in enumerate(zip(frames, [(0, 0, 0), (2, -1, 0), (0, 3, 1)])):
        frame.info["dipole"] = frame.info["dipole"] + np.asarray(integers) @ frame.info["polarization_quantum"]
        frame.info["origin"] = f"trajectory-uuid:{10 * index}"
    other = make_toy_frames(1, seed=10, fields=(), branch_shift_fraction=0.0)[0]
    other.info["origin"] = "another-trajectory:5"
    aligned = align_dipole_branches(frames[::-1] + [other])[::-1][1:]  # order in the list does not matter
    assert len({frame.info["dipole_branch"] for frame in aligned}) == 1
    for frame, truth in zip(aligned, exact):
        np.testing.assert_allclose(frame.info["dipole"], truth, atol=1e-9)
