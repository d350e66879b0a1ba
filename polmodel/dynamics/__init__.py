"""Running a model on atoms in time under a homogeneous electric field: field protocols, the field as a
function of time (fields.py), the ASE calculator whose energy is the electric enthalpy (calculator.py), molecular
dynamics on ASE's integrators with uncertainty monitoring and trajectories that can be restarted (md.py), and the two
routes into LAMMPS: `fix external` across MPI ranks (lammps_driver.py; its command is `polmodel lammps`) and an
ML-IAP unified class (mliap.py)."""
