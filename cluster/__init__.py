"""The local development cluster (`local.py`: Ray nodes on loopback addresses and the MLflow server, run by
`cluster/local.sh`) and the files real clusters are built from (Dockerfile, aws.yaml, kuberay/). `launch` and
`bench` use `cluster.local`'s client environment and `kill_groups`; nothing here imports our other packages."""
