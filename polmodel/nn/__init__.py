"""The energy model and everything that evaluates it: `PolModel`, message passing on equivariant edge messages
(model.py, edge_messages.py; e3nn is imported in this package only), its physical derivatives — forces, stress,
polarization, Born charges, polarizability — from the one energy (response.py, with the per-edge shortcut of
edge_inputs.py), the same response of a large cell by exact spatial chunks in bounded memory (chunked.py), a committee
of models whose spread is the uncertainty (ensemble.py), and the model and ensemble files (serialization.py, on the
format of model_file.py). Its inputs are those of polmodel.data."""
