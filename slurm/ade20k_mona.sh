#!/usr/bin/env bash
# ADE20K semantic segmentation: UperNet on Swin-L with Mona (160k iterations, 512 crops, 16 per step).
#
# Defaults: 1 node x 8 GPUs = 8 ranks x 2 images: the official 16 images per step (log/ade20k/mona.txt: 8 GPUs), one task (= one rank) per GPU.
# The recipe fixes the images per step (train.global_batch): on other world sizes each rank's share and
# the gradient accumulation follow; a world size that cannot split it is refused. Override, e.g.
#   sbatch slurm/ade20k_mona.sh
#   SET="optim.lr=2e-4" RUN_DIR=runs/try1 sbatch --nodes=2 slurm/ade20k_mona.sh
#   CONFIG=configs/cpu/ade20k.yaml sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-task=0 slurm/ade20k_mona.sh   # CPU-only nodes
# Submit from the checkout (or set MONA_DIST_ROOT). Knobs and the pre-emption/requeue protocol: slurm/common.sh.
#SBATCH --job-name=ade20k_mona
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

source "${MONA_DIST_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"
mona_train configs/ade20k_mona_swin_l.yaml
