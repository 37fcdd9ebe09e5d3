#!/usr/bin/env bash
# Image classification (Flowers/Pets/VOC07 single-label): Swin-L with Mona (100 epochs).
#
# Defaults: 4 nodes x 8 GPUs, one task (= one rank) per GPU. Override with sbatch flags or environment, e.g.
#   sbatch slurm/cls_mona.sh
#   SET="train.max_steps=1000" RUN_DIR=runs/try1 sbatch --nodes=2 slurm/cls_mona.sh
#   CONFIG=configs/cpu/cls.yaml sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 slurm/cls_mona.sh   # CPU-only nodes
# Submit from the checkout (or set MONA_DIST_ROOT). Knobs and the pre-emption/requeue protocol: slurm/common.sh.
#SBATCH --job-name=cls_mona
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

source "${MONA_DIST_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"
mona_train configs/cls_mona_swin_l.yaml
