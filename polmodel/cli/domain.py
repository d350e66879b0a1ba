"""Record what a model file was trained on beside it, for files saved without their training domain.

`polmodel domain MODEL FRAMES [--convention allegro-pol] [--sampled-temperature K]` measures the domain of the
training frames (per species pair the shortest and typical nearest-neighbour distances, the density, the largest
field; polmodel/data/domain.py) and writes it to MODEL.domain.json with the sha256 of both files. `polmodel.load`
gives it to a model whose file has none, so `polmodel md` and PolCalculator warn before the first step on a
structure in Bohr, a squeezed cell, a field far beyond the labels or MD far hotter than the frames. The model file
is not touched: a file that is a node of a provenance archive stays byte-identical to it. Models trained now store
their domain themselves and need no record.
"""


def add_arguments(parser):
    parser.add_argument("model", help="model or ensemble file")
    parser.add_argument("frames", help="the frames the model was trained on (extended XYZ, optionally gzipped)")
    parser.add_argument("--convention", default="polmodel",
                        help="label convention of FRAMES: polmodel (default) or a foreign one (allegro-pol)")
    parser.add_argument("--sampled-temperature", type=float, default=None, metavar="K",
                        help="the highest MD temperature the frames were sampled at, where they do not record it")
    parser.add_argument("--labelled-field", type=float, default=None, metavar="V/Å",
                        help="the field the labels were taken at (e.g. the finite-difference field of Z* and α in "
                             "zero-field frames): the domain's largest field is at least this")
    parser.add_argument("--note", default=None, help="where the frames and the temperature come from (kept in the "
                        "record)")


def run(args):
    import math

    from polmodel.cli import InputError, check_input_file, check_output_file, load_model_file

    check_input_file(args.model, "model")
    check_input_file(args.frames, "frames file")
    if args.sampled_temperature is not None and not (math.isfinite(args.sampled_temperature)
                                                     and args.sampled_temperature > 0):
        raise InputError(f"--sampled-temperature must be a positive temperature in K, got {args.sampled_temperature}")
    if args.labelled_field is not None and not (math.isfinite(args.labelled_field) and args.labelled_field > 0):
        raise InputError(f"--labelled-field must be a positive field in V/Å, got {args.labelled_field}")
    from polmodel.data.domain import domain_record_path, model_domain, write_domain_record

    check_output_file(domain_record_path(args.model), "the domain record")
    model = load_model_file(args.model, "model")
    recorded = model_domain(model)
    if recorded is not None and not _from_record(args.model):
        raise InputError(f"model {args.model} stores its training domain already: it needs no record")
    from polmodel.data.external import read_external_frames
    from polmodel.data.frames import FrameError, read_frames

    try:
        frames = (read_frames(args.frames) if args.convention == "polmodel"
                  else read_external_frames(args.frames, args.convention))
    except (FrameError, ValueError, KeyError, OSError) as error:
        raise InputError(f"frames file {args.frames}: {error}") from error
    species = sorted({symbol for frame in frames for symbol in frame.get_chemical_symbols()})
    unknown = sorted(set(species) - set(model.species))
    if unknown:
        raise InputError(f"frames file {args.frames} has {', '.join(unknown)}, which the model does not know: not "
                         "its training frames")
    record = write_domain_record(args.model, frames, model.cutoff, args.frames, args.sampled_temperature,
                                 args.labelled_field, args.note)
    domain = record["domain"]
    print(f"wrote {domain_record_path(args.model)}: {len(frames)} frames, {len(domain['pairs'])} species pairs, "
          f"field up to {domain['field_max']:.3g} V/Å, sampled at "
          f"{domain['sampled_temperature_K'] if domain['sampled_temperature_K'] is not None else 'an unknown'} K")
    return 0


def _from_record(model_path):
    import os

    from polmodel.data.domain import domain_record_path

    return os.path.isfile(domain_record_path(model_path))
