from sb3_elmur.export.cli import main

main()
