"""Test infrastructure that the tests and the benchmarks share.

`repo`: clean copies of this work tree (what a clone would hold), committed in a fresh git repo,
and the commands run in them. `servers`: real servers on free 127.0.0.1 ports (`mlflow server`,
PostgreSQL, moto's S3), each stopped as a whole afterwards.

These modules import the standard library and, inside their functions, the venv's tools (boto3,
moto); never imgclf, a test module or bench/. Benchmarks (bench/) import them; tests never
import bench/.
"""
