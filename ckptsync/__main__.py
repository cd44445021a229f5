from ckptsync.cli import main

main()
