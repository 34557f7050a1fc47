from ketanode.cli.main import run

run()
