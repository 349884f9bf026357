from sb3_elmur.tmaze_eval.cli import main

main()
