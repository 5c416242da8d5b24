from fedcvr.cli import main

main()
