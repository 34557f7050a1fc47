from ketanode.cli import run

run()
