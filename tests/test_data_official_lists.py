"""`mergevid data lists`: UCF-101 / HMDB-51 / Kinetics / SSv2 official annotation files -> our lists and class CSVs,
and the refusals that point at the converter when an official file is given as a list or class CSV."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from data_helpers import write_level_video

from mergekit_video.cli.main import main as cli_main
from mergekit_video.data import VideoDataset, read_annotation_list, read_class_names
from mergekit_video.data.official_lists import (hmdb51_lists, kinetics_lists, ssv2_class_name, ssv2_lists, ucf101_display_name,
                                                ucf101_lists)

# UCF-101's classInd.txt folders, and the names of MoTE's lists/ucf101/ucf_labels.csv (the same order)
UCF101_FOLDERS = """ApplyEyeMakeup ApplyLipstick Archery BabyCrawling BalanceBeam BandMarching BaseballPitch Basketball BasketballDunk
BenchPress Biking Billiards BlowDryHair BlowingCandles BodyWeightSquats Bowling BoxingPunchingBag BoxingSpeedBag BreastStroke
BrushingTeeth CleanAndJerk CliffDiving CricketBowling CricketShot CuttingInKitchen Diving Drumming Fencing FieldHockeyPenalty
FloorGymnastics FrisbeeCatch FrontCrawl GolfSwing Haircut Hammering HammerThrow HandstandPushups HandstandWalking HeadMassage
HighJump HorseRace HorseRiding HulaHoop IceDancing JavelinThrow JugglingBalls JumpingJack JumpRope Kayaking Knitting LongJump
Lunges MilitaryParade Mixing MoppingFloor Nunchucks ParallelBars PizzaTossing PlayingCello PlayingDaf PlayingDhol PlayingFlute
PlayingGuitar PlayingPiano PlayingSitar PlayingTabla PlayingViolin PoleVault PommelHorse PullUps Punch PushUps Rafting
RockClimbingIndoor RopeClimbing Rowing SalsaSpin ShavingBeard Shotput SkateBoarding Skiing Skijet SkyDiving SoccerJuggling
SoccerPenalty StillRings SumoWrestling Surfing Swing TableTennisShot TaiChi TennisSwing ThrowDiscus TrampolineJumping Typing
UnevenBars VolleyballSpiking WalkingWithDog WallPushups WritingOnBoard YoYo""".split()
MOTE_UCF_LABELS = (
    "Apply Eye Makeup|Apply Lipstick|Archery|Baby Crawling|Balance Beam|Band Marching|Baseball Pitch|Basketball|Basketball Dunk|"
    "Bench Press|Biking|Billiards|Blow Dry Hair|Blowing Candles|Body Weight Squats|Bowling|Boxing Punching Bag|Boxing Speed Bag|"
    "Breast Stroke|Brushing Teeth|Clean And Jerk|Cliff Diving|Cricket Bowling|Cricket Shot|Cutting In Kitchen|Diving|Drumming|"
    "Fencing|Field Hockey Penalty|Floor Gymnastics|Frisbee Catch|Front Crawl|Golf Swing|Haircut|Hammering|Hammer Throw|"
    "Handstand Pushups|Handstand Walking|Head Massage|High Jump|Horse Race|Horse Riding|Hula Hoop|Ice Dancing|Javelin Throw|"
    "Juggling Balls|Jumping Jack|Jump Rope|Kayaking|Knitting|Long Jump|Lunges|Military Parade|Mixing|Mopping Floor|Nunchucks|"
    "Parallel Bars|Pizza Tossing|Playing Cello|Playing Daf|Playing Dhol|Playing Flute|Playing Guitar|Playing Piano|Playing Sitar|"
    "Playing Tabla|Playing Violin|Pole Vault|Pommel Horse|Pull Ups|Punch|Push Ups|Rafting|Rock Climbing Indoor|Rope Climbing|"
    "Rowing|Salsa Spin|Shaving Beard|Shotput|Skate Boarding|Skiing|Skijet|Sky Diving|Soccer Juggling|Soccer Penalty|Still Rings|"
    "Sumo Wrestling|Surfing|Swing|Table Tennis Shot|Tai Chi|Tennis Swing|Throw Discus|Trampoline Jumping|Typing|Uneven Bars|"
    "Volleyball Spiking|Walking With Dog|Wall Pushups|Writing On Board|YoYo").split("|")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def crlf(path: Path, rows: list[str]) -> Path:
    """A text file with Windows line ends, as the official UCF-101 and HMDB-51 files have."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(r + "\r\n" for r in rows).encode())
    return path


def write_ucf(folder: Path, *, ext: str = "avi") -> Path:
    """A 3-class ucfTrainTestlist/: classInd.txt (1-based), trainlist01/02 with labels, testlist01/02 without."""
    crlf(folder / "classInd.txt", ["1 ApplyEyeMakeup", "2 HandstandPushups", "3 YoYo"])
    crlf(folder / "trainlist01.txt", [f"ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.{ext} 1", f"HandstandPushups/v_HandStandPushups_g08_c01.{ext} 2",
                                      f"YoYo/v_YoYo_g08_c01.{ext} 3"])
    crlf(folder / "testlist01.txt", [f"ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.{ext}", f"HandstandPushups/v_HandStandPushups_g01_c01.{ext}",
                                     f"YoYo/v_YoYo_g01_c01.{ext}"])
    crlf(folder / "trainlist02.txt", [f"YoYo/v_YoYo_g01_c01.{ext} 3"])
    crlf(folder / "testlist02.txt", [f"YoYo/v_YoYo_g08_c01.{ext}"])
    return folder


def write_hmdb(folder: Path) -> Path:
    """Two classes, splits 1 and 2: markers 1 = train, 2 = test, 0 = unused; a video name starting with '#', trailing spaces."""
    crlf(folder / "brush_hair_test_split1.txt", ["April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 ", "Aussie_brush_hair_u_nm_np1_ri_med_3.avi 2 ",
                                                 "Blonde_brush_hair_f_nm_np1_fr_goo_0.avi 0 "])
    crlf(folder / "brush_hair_test_split2.txt", ["April_09_brush_hair_u_nm_np1_ba_goo_0.avi 2 ", "Aussie_brush_hair_u_nm_np1_ri_med_3.avi 1 ",
                                                 "Blonde_brush_hair_f_nm_np1_fr_goo_0.avi 1 "])
    crlf(folder / "chew_test_split1.txt", ["#2_Gum_chew_h_nm_np1_fr_med_0.avi 1 ", "Bubble (2)_chew_h_nm_np1_fr_bad_0.avi 2 "])
    crlf(folder / "chew_test_split2.txt", ["#2_Gum_chew_h_nm_np1_fr_med_0.avi 0 ", "Bubble (2)_chew_h_nm_np1_fr_bad_0.avi 2 "])
    return folder


K400_HEADER = "label,youtube_id,time_start,time_end,split"


def write_kinetics(tmp_path: Path) -> tuple[Path, Path, Path]:
    """train.csv (5 rows, 2 missing) and kinetics-400_val.csv (an is_cc column, 1 row) with a video folder holding
    <split>/<label>/{id}_{start:06d}_{end:06d}.mp4, a flat {id}.mkv, a partial download and a stray file."""
    root = tmp_path / "k400"
    for rel in ("train/abseiling/-abc_def_000014_000024.mp4", "train/air drumming/xyz123_000001_000011.mp4", "train/Zqx9.mkv",
                "train/abseiling/gone___000003_000013.mp4.part", "val/abseiling/val001_000100_000110.webm", "notes.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    train = tmp_path / "ann" / "train.csv"
    train.parent.mkdir()
    train.write_text("\n".join([K400_HEADER, "abseiling,-abc_def,14,24,train", '"air drumming",xyz123,1,11,train',
                                "zumba,Zqx9,0,10,train", "abseiling,gone___,3,13,train", "zumba,never,20,30,train"]) + "\n")
    val = tmp_path / "ann" / "kinetics-400_val.csv"
    val.write_text(K400_HEADER + ",is_cc\nabseiling,val001,100.0,110.0,val,0\n")
    return root, train, val


def test_ucf101_names_match_motes_ucf_labels_csv():
    assert len(UCF101_FOLDERS) == len(MOTE_UCF_LABELS) == 101
    assert [ucf101_display_name(f) for f in UCF101_FOLDERS] == MOTE_UCF_LABELS
    got = {f: ucf101_display_name(f) for f in ("YoYo", "PlayingDaf", "JumpingJack", "SkyDiving", "Skijet", "TaiChi", "PushUps",
                                               "BlowDryHair", "HandstandPushups")}
    assert got == {"YoYo": "YoYo", "PlayingDaf": "Playing Daf", "JumpingJack": "Jumping Jack", "SkyDiving": "Sky Diving",
                   "Skijet": "Skijet", "TaiChi": "Tai Chi", "PushUps": "Push Ups", "BlowDryHair": "Blow Dry Hair",
                   "HandstandPushups": "Handstand Pushups"}


def test_ucf101_lists(tmp_path):
    res = ucf101_lists(write_ucf(tmp_path / "ucfTrainTestlist"))
    assert res.class_names == ["Apply Eye Makeup", "Handstand Pushups", "YoYo"] and res.class_csv == "ucf_labels.csv"
    assert list(res.lists) == ["trainlist01.txt", "testlist01.txt", "trainlist02.txt", "testlist02.txt"]
    assert (res.train, res.test) == (["trainlist01.txt", "trainlist02.txt"], ["testlist01.txt", "testlist02.txt"])
    assert [(r.path, r.label) for r in res.lists["trainlist01.txt"]] == [
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", 0), ("HandstandPushups/v_HandStandPushups_g08_c01.avi", 1),
        ("YoYo/v_YoYo_g08_c01.avi", 2)]
    assert [(r.path, r.label) for r in res.lists["testlist01.txt"]] == [
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", 0), ("HandstandPushups/v_HandStandPushups_g01_c01.avi", 1),
        ("YoYo/v_YoYo_g01_c01.avi", 2)]
    assert ucf101_lists(tmp_path / "ucfTrainTestlist", names="raw").class_names == ["ApplyEyeMakeup", "HandstandPushups", "YoYo"]


def test_ucf101_refuses_inconsistent_files(tmp_path):
    folder = write_ucf(tmp_path / "u")
    crlf(folder / "trainlist01.txt", ["YoYo/v_YoYo_g08_c01.avi 2"])
    with pytest.raises(ValueError, match=r"trainlist01.txt:1: label 2 of 'YoYo/v_YoYo_g08_c01.avi', but classInd.txt gives its class YoYo id 3"):
        ucf101_lists(folder)
    crlf(folder / "trainlist01.txt", ["Juggling/v_Juggling_g08_c01.avi 3"])
    with pytest.raises(ValueError, match=r"trainlist01.txt:1: class folder 'Juggling' .* is not in classInd.txt"):
        ucf101_lists(folder)
    (folder / "classInd.txt").unlink()
    with pytest.raises(FileNotFoundError, match="classInd.txt not found"):
        ucf101_lists(folder)
    with pytest.raises(FileNotFoundError) as info:
        ucf101_lists(folder / "testlist01.txt")
    assert str(info.value) == (f"{folder / 'testlist01.txt'} is a file; give the official UCF-101 split folder itself "
                               "(ucfTrainTestlist/ with classInd.txt, trainlist01.txt, testlist01.txt)")
    with pytest.raises(FileNotFoundError) as info:  # the folder above it: named
        ucf101_lists(write_ucf(tmp_path / "ucf" / "ucfTrainTestlist").parent)
    assert str(info.value) == (f"{tmp_path / 'ucf' / 'classInd.txt'} not found; give the official ucfTrainTestlist/ folder itself: "
                               f"{tmp_path / 'ucf' / 'ucfTrainTestlist'}")


def test_hmdb51_lists(tmp_path):
    res = hmdb51_lists(write_hmdb(tmp_path / "testTrainMulti_7030_splits"))
    with pytest.raises(FileNotFoundError) as info:
        hmdb51_lists(tmp_path / "testTrainMulti_7030_splits" / "chew_test_split1.txt")
    assert str(info.value) == (f"{tmp_path / 'testTrainMulti_7030_splits' / 'chew_test_split1.txt'} is a file; give the official "
                               "HMDB-51 split folder itself (testTrainMulti_7030_splits/ with brush_hair_test_split1.txt, ...)")
    assert res.class_names == ["brush hair", "chew"] and res.class_csv == "hmdb51_labels.csv"
    assert (res.train, res.test) == (["trainlist_split1.txt", "trainlist_split2.txt"], ["vallist_split1.txt", "vallist_split2.txt"])
    as_lines = {name: [f"{r.path} {r.label}" for r in recs] for name, recs in res.lists.items()}
    assert as_lines == {
        "trainlist_split1.txt": ["brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi 0", "chew/#2_Gum_chew_h_nm_np1_fr_med_0.avi 1"],
        "vallist_split1.txt": ["brush_hair/Aussie_brush_hair_u_nm_np1_ri_med_3.avi 0", "chew/Bubble (2)_chew_h_nm_np1_fr_bad_0.avi 1"],
        "trainlist_split2.txt": ["brush_hair/Aussie_brush_hair_u_nm_np1_ri_med_3.avi 0", "brush_hair/Blonde_brush_hair_f_nm_np1_fr_goo_0.avi 0"],
        "vallist_split2.txt": ["brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi 0", "chew/Bubble (2)_chew_h_nm_np1_fr_bad_0.avi 1"],
    }
    assert hmdb51_lists(tmp_path / "testTrainMulti_7030_splits", names="raw").class_names == ["brush_hair", "chew"]
    (tmp_path / "testTrainMulti_7030_splits" / "chew_test_split2.txt").unlink()
    with pytest.raises(ValueError, match=r"chew_test_split2.txt is missing \(other classes have splits \[1, 2\]\)"):
        hmdb51_lists(tmp_path / "testTrainMulti_7030_splits")
    crlf(tmp_path / "bad" / "chew_test_split1.txt", ["a.avi 3"])
    with pytest.raises(ValueError, match=r"chew_test_split1.txt:1: expected '<video>.avi <0\|1\|2>'"):
        hmdb51_lists(tmp_path / "bad")


def test_kinetics_lists_find_videos_and_report_missing(tmp_path):
    root, train, val = write_kinetics(tmp_path)
    res = kinetics_lists([train, val], root=root)
    assert res.class_names == ["abseiling", "air drumming", "zumba"] and res.class_csv == "kinetics_3_labels.csv"
    assert list(res.lists) == ["train.txt", "val.txt"] and (res.train, res.test) == (["train.txt"], ["val.txt"])
    assert [(r.path, r.label) for r in res.lists["train.txt"]] == [
        ("train/abseiling/-abc_def_000014_000024.mp4", 0), ("train/air drumming/xyz123_000001_000011.mp4", 1), ("train/Zqx9.mkv", 2)]
    assert [(r.path, r.label) for r in res.lists["val.txt"]] == [("val/abseiling/val001_000100_000110.webm", 0)]
    missing = res.missing["train.txt"]
    assert (missing.file_name, missing.count, missing.total) == ("train_missing.csv", 2, 5)
    assert missing.lines == [K400_HEADER, "abseiling,gone___,3,13,train", "zumba,never,20,30,train"]
    assert "val.txt" not in res.missing


def test_kinetics_classes_csv_gives_the_train_ids(tmp_path):
    root, train, val = write_kinetics(tmp_path)
    classes = tmp_path / "classes.csv"
    classes.write_text("id,name\n0,zumba\n1,abseiling\n")
    res = kinetics_lists([val], root=root, classes=classes)
    assert res.class_names == ["zumba", "abseiling"] and [r.label for r in res.lists["val.txt"]] == [1]
    with pytest.raises(ValueError, match=r"train.csv:3: label 'air drumming' is not a class of .*classes.csv"):
        kinetics_lists([train], root=root, classes=classes)
    test = tmp_path / "test.csv"
    test.write_text("youtube_id,time_start,time_end,split\nabc,0,10,test\n")
    with pytest.raises(ValueError, match="test.csv has no label column"):
        kinetics_lists([test], root=root)
    with pytest.raises(FileNotFoundError, match=r"none of the 1 videos of .*nowhere.csv is under .* \(the first would be nope_000000_000010.mp4"):
        (tmp_path / "nowhere.csv").write_text(K400_HEADER + "\nzumba,nope,0,10,somewhere\n")
        kinetics_lists([tmp_path / "nowhere.csv"], root=root)


def write_ssv2(folder: Path) -> list[Path]:
    folder.mkdir()
    labels = {"Approaching something with your camera": "0", "Holding something next to something": "1",
              "Putting something that can't roll onto a slanted surface, so it stays where it is": "2"}
    train = [{"id": "78687", "label": "holding potato next to vicks vaporub bottle", "template": "Holding [something] next to [something]",
              "placeholders": ["potato", "vicks vaporub bottle"]},
             {"id": "42326", "label": "approaching a mug with your camera", "template": "Approaching [something] with your camera",
              "placeholders": ["a mug"]}]
    val = [{"id": "74225", "label": "putting a ball onto a slope", "template":
            "Putting [something that can't roll] onto a slanted surface, so it stays where it is", "placeholders": ["a ball"]}]
    paths = []
    for name, data in (("labels", labels), ("train", train), ("validation", val)):
        paths.append(folder / f"something-something-v2-{name}.json")
        paths[-1].write_text(json.dumps(data))
    return paths


def test_ssv2_lists(tmp_path):
    labels, train, val = write_ssv2(tmp_path / "ssv2")
    assert ssv2_class_name("Holding [something] next to [something]") == "Holding something next to something"
    res = ssv2_lists([train, labels, val])
    assert res.class_names == ["Approaching something with your camera", "Holding something next to something",
                               "Putting something that can't roll onto a slanted surface, so it stays where it is"]
    assert res.class_csv == "ssv2_labels.csv" and (res.train, res.test) == (["train.txt"], ["val.txt"])
    assert [(r.path, r.label) for r in res.lists["train.txt"]] == [("78687.webm", 1), ("42326.webm", 0)]
    assert [(r.path, r.label) for r in res.lists["val.txt"]] == [("74225.webm", 2)]
    test = tmp_path / "ssv2" / "something-something-v2-test.json"
    test.write_text('[{"id": "1420"}]')
    with pytest.raises(ValueError, match=r"video 0 \(id 1420\) has no 'template'"):
        ssv2_lists([labels, test])
    with pytest.raises(ValueError, match="give something-something-v2-labels.json too"):
        ssv2_lists([train])


def test_cli_writes_lists_refuses_existing_and_prints_recipe_keys(tmp_path, capsys):
    folder = write_ucf(tmp_path / "ucfTrainTestlist")
    out = tmp_path / "lists"
    assert cli_main(["data", "lists", "ucf101", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["testlist01.txt", "testlist02.txt", "trainlist01.txt", "trainlist02.txt", "ucf_labels.csv"]
    assert lines(out / "testlist01.txt") == ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 0", "HandstandPushups/v_HandStandPushups_g01_c01.avi 1",
                                             "YoYo/v_YoYo_g01_c01.avi 2"]
    assert lines(out / "ucf_labels.csv") == ["id,name", "0,Apply Eye Makeup", "1,Handstand Pushups", "2,YoYo"]
    sections = yaml.safe_load(printed.split("\n\n", 1)[1])  # what is pasted into a recipe, as printed
    assert sections["data"] == {"root": "<the UCF-101 folder (it holds ApplyEyeMakeup/, ApplyLipstick/, ...)>",
                                "train_list": str(out / "trainlist01.txt"), "val_list": str(out / "testlist01.txt"),
                                "class_csv": str(out / "ucf_labels.csv")}
    assert sections["eval"]["datasets"] == [{"name": "ucf101", "kind": "zero_shot", "root": sections["data"]["root"],
                                             "class_csv": str(out / "ucf_labels.csv"),
                                             "splits": [{"list": str(out / "testlist01.txt")}, {"list": str(out / "testlist02.txt")}],
                                             "num_clips": 3, "num_crops": 1, "num_frames": 8}]  # zeroshot_ucf101.yaml's views
    assert printed.split("\n\n", 1)[1].startswith(
        "# recipe sections for these lists (the lists' paths are relative to root): merge them into the recipe's data\n"
        "# and eval sections, in place of its entries of the same name; eval.summary names the datasets to score, so\n"
        "# keep these names or update it (MoTE's zero-shot views: 3 clips x 1 crop of 8 frames)\n"
        "# kind: zero_shot is MoTE's protocol for a model trained on other classes (Kinetics); close_set for one\n"
        "# trained on these; the few-shot recipes (fewshot_*.yaml) take kind: few_shot with num_clips: 1, num_crops: 1\ndata:\n")

    assert cli_main(["data", "lists", "ucf101", str(folder), "--out", str(out), "--names", "raw"]) == 1
    assert f"error: {out / 'trainlist01.txt'} exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert lines(out / "ucf_labels.csv")[1] == "0,Apply Eye Makeup"
    assert cli_main(["data", "lists", "ucf101", str(folder), "--out", str(out), "--names", "raw", "--overwrite"]) == 0
    assert lines(out / "ucf_labels.csv")[1] == "0,ApplyEyeMakeup"
    assert cli_main(["data", "lists", "ucf101", str(folder), "--out", str(folder), "--overwrite"]) == 1
    assert "trainlist01.txt is one of the official files being converted; write to another --out" in capsys.readouterr().err
    assert lines(folder / "trainlist01.txt")[0] == "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"


def test_cli_kinetics_writes_the_missing_list(tmp_path, capsys):
    root, train, val = write_kinetics(tmp_path)
    out = tmp_path / "lists"
    assert cli_main(["data", "lists", "kinetics", str(train), str(val), "--root", str(root), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["kinetics_3_labels.csv", "train.txt", "train_missing.csv", "val.txt"]
    assert lines(out / "train.txt") == ["train/abseiling/-abc_def_000014_000024.mp4 0", "train/air drumming/xyz123_000001_000011.mp4 1",
                                        "train/Zqx9.mkv 2"]
    assert lines(out / "train_missing.csv") == [K400_HEADER, "abseiling,gone___,3,13,train", "zumba,never,20,30,train"]
    assert f"train.txt: 2 of 5 videos (40.0%) not found under {root}; left out, listed in {out / 'train_missing.csv'}" in captured.err
    assert f"  root: {root}\n" in captured.out and f"    list: {out / 'val.txt'}\n" in captured.out
    assert cli_main(["data", "lists", "kinetics", str(train), "--out", str(out)]) == 1
    assert "kinetics needs --root" in capsys.readouterr().err
    # val and test are two datasets, never splits averaged as mean ± std
    test = tmp_path / "ann" / "test.csv"
    test.write_text(K400_HEADER + "\nabseiling,val001,100,110,test\n")
    assert cli_main(["data", "lists", "kinetics", str(train), str(val), str(test), "--root", str(root), "--out", str(out), "--overwrite"]) == 0
    printed = capsys.readouterr().out
    entries = yaml.safe_load(printed.split("\n\n", 1)[1])["eval"]["datasets"]
    assert [(e["name"], e["kind"], e["list"], e["num_clips"], e["num_crops"]) for e in entries] == [
        ("kinetics_val", "close_set", str(out / "val.txt"), 4, 3), ("kinetics_test", "close_set", str(out / "test.txt"), 4, 3)]
    # every video found now: the earlier missing list would be wrong beside the new list, so --overwrite removes it
    for rel in ("train/abseiling/gone____000003_000013.mp4", "train/zumba/never_000020_000030.mp4"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    assert cli_main(["data", "lists", "kinetics", str(train), "--root", str(root), "--out", str(out)]) == 1
    assert f"{out / 'train.txt'} exists; pass --overwrite" in capsys.readouterr().err
    (out / "train.txt").unlink()
    (out / "kinetics_3_labels.csv").unlink()
    assert cli_main(["data", "lists", "kinetics", str(train), "--root", str(root), "--out", str(out)]) == 1
    assert f"{out / 'train_missing.csv'} exists; pass --overwrite" in capsys.readouterr().err
    assert cli_main(["data", "lists", "kinetics", str(train), "--root", str(root), "--out", str(out), "--overwrite"]) == 0
    assert f"removed {out / 'train_missing.csv'}: an earlier conversion's missing videos (none are missing now)" in capsys.readouterr().out
    assert not (out / "train_missing.csv").exists() and len(lines(out / "train.txt")) == 5


def test_cli_root_leaves_out_missing_videos(tmp_path, capsys):
    folder = write_hmdb(tmp_path / "splits")
    root = tmp_path / "hmdb51"
    for rel in ("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi", "chew/#2_Gum_chew_h_nm_np1_fr_med_0.avi",
                "brush_hair/Aussie_brush_hair_u_nm_np1_ri_med_3.avi", "brush_hair/Blonde_brush_hair_f_nm_np1_fr_goo_0.avi"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    out = tmp_path / "lists"
    assert cli_main(["data", "lists", "hmdb51", str(folder), "--root", str(root), "--out", str(out)]) == 0
    assert "vallist_split1.txt: 1 of 2 videos (50.0%) not found" in capsys.readouterr().err
    assert lines(out / "vallist_split1.txt") == ["brush_hair/Aussie_brush_hair_u_nm_np1_ri_med_3.avi 0"]
    assert lines(out / "vallist_split1_missing.txt") == ["chew/Bubble (2)_chew_h_nm_np1_fr_bad_0.avi"]
    assert lines(out / "hmdb51_labels.csv") == ["id,name", "0,brush hair", "1,chew"]


def test_official_files_given_as_our_lists_are_refused_with_the_converter(tmp_path):
    ucf = write_ucf(tmp_path / "ucfTrainTestlist")
    with pytest.raises(ValueError, match=r"testlist01.txt:1: expected 'relative/path.mp4 label', got "
                                         r"'ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi'; official UCF-101 test lists have no labels: "
                                         r"convert them with mergevid data lists ucf101"):
        read_annotation_list(ucf / "testlist01.txt")
    with pytest.raises(ValueError, match=r"classInd.txt: expected a header 'id,name', got '1 ApplyEyeMakeup'; this looks like UCF-101's "
                                         r"classInd.txt .*mergevid data lists ucf101"):
        read_class_names(ucf / "classInd.txt")
    official_train = crlf(tmp_path / "official" / "trainlist01.txt", ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1",
                                                                      "YoYo/v_YoYo_g08_c01.avi 101"])
    with pytest.raises(ValueError, match=r"an official UCF-101 train list \(labels 1..101, ours are 0-based\): convert it with mergevid data lists ucf101"):
        read_annotation_list(official_train)
    hmdb = write_hmdb(tmp_path / "splits")
    with pytest.raises(ValueError, match=r"brush_hair_test_split1.txt: an official HMDB-51 split file \(1 = train, 2 = test, not class ids\): "
                                         r"convert with mergevid data lists hmdb51"):
        read_annotation_list(hmdb / "brush_hair_test_split1.txt")
    _, train, _ = write_kinetics(tmp_path)
    with pytest.raises(ValueError, match="this is an official Kinetics CSV: convert it with mergevid data lists kinetics"):
        read_annotation_list(train)
    with pytest.raises(ValueError, match="this is an official Kinetics CSV: mergevid data lists kinetics writes the class CSV"):
        read_class_names(train)
    with pytest.raises(ValueError, match=r"classInd.txt:1: label 'ApplyEyeMakeup' is not a whole number.*this is UCF-101's class index, not a list"):
        read_annotation_list(ucf / "classInd.txt")
    one_line = tmp_path / "something-something-v2-train.json"
    one_line.write_text("[" + ", ".join('{"id": "%d", "template": "Holding [something]"}' % i for i in range(2000)) + "]")
    for read in (read_annotation_list, lambda p: kinetics_lists([p], root=tmp_path)):
        with pytest.raises(ValueError, match=r"\.\.\. \([0-9]+ characters\).*mergevid data lists ssv2") as info:
            read(one_line)
        assert len(str(info.value)) < 600  # not the whole file
    # our own lists under the same names still load: the converter's output, and 0/1/2 labels in another file
    mine = tmp_path / "mine" / "vallist_split1.txt"
    mine.parent.mkdir()
    mine.write_text("brush_hair/a.avi 0\nchew/b.avi 1\n")
    assert [r.label for r in read_annotation_list(mine)] == [0, 1]
    k600 = tmp_path / "mine" / "k160_test_split1.txt"
    k600.write_text("a/x.mp4 0\nb/y.mp4 1\nc/z.mp4 2\n")
    assert [r.label for r in read_annotation_list(k600)] == [0, 1, 2]


def test_converted_ucf_lists_load_through_the_dataset(tmp_path, caplog):
    root = tmp_path / "UCF-101"
    for rel in ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.mp4", "YoYo/v_YoYo_g01_c01.mp4", "YoYo/v_YoYo_g08_c01.mp4"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_level_video(root / rel, n=16)
    folder = write_ucf(tmp_path / "ucfTrainTestlist", ext="mp4")
    out = tmp_path / "lists"
    assert cli_main(["data", "lists", "ucf101", str(folder), "--out", str(out), "--root", str(root)]) == 0
    assert lines(out / "testlist01_missing.txt") == ["HandstandPushups/v_HandStandPushups_g01_c01.mp4"]
    assert lines(out / "trainlist01.txt") == ["YoYo/v_YoYo_g08_c01.mp4 2"] and not (out / "testlist02_missing.txt").exists()
    with caplog.at_level(logging.WARNING):
        ds = VideoDataset(list_file=out / "testlist01.txt", root=root, class_names=out / "ucf_labels.csv", train=False,
                          num_frames=4, input_size=32)
    assert ds.class_names == ["Apply Eye Makeup", "Handstand Pushups", "YoYo"] and not caplog.records
    items = [ds[i] for i in range(len(ds))]
    assert [it["label"] for it in items] == [0, 2] and items[0]["frames"].shape == (1, 4, 3, 32, 32)


def test_printed_recipe_keys_paste_into_yaml_and_kinetics_val_reuses_the_train_classes(tmp_path, capsys):

    folder = write_ucf(tmp_path / "ucfTrainTestlist")
    root, out = tmp_path / "UCF-101 #2", tmp_path / "lists,x"
    root.mkdir()
    assert cli_main(["data", "lists", "ucf101", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    keys = yaml.safe_load(printed.split("\n\n", 1)[1])
    assert keys["data"]["train_list"] == str(out / "trainlist01.txt")
    assert [s["list"] for s in keys["eval"]["datasets"][0]["splits"]] == [str(out / "testlist01.txt"), str(out / "testlist02.txt")]
    for name in ("trainlist01.txt", "trainlist02.txt", "testlist01.txt", "testlist02.txt"):
        for line in lines(out / name):
            (root / line.rsplit(" ", 1)[0]).parent.mkdir(parents=True, exist_ok=True)
            (root / line.rsplit(" ", 1)[0]).write_bytes(b"x")
    assert cli_main(["data", "lists", "ucf101", str(folder), "--out", str(tmp_path / "l2"), "--root", str(root)]) == 0
    keys = yaml.safe_load(capsys.readouterr().out.split("\n\n", 1)[1])
    assert keys["data"]["root"] == str(root)  # ' #2' is not a comment
    # the documented workflow: val converted with the train split's class CSV, in the same --out, without --overwrite
    kroot, train, val = write_kinetics(tmp_path)
    kout = tmp_path / "k"
    assert cli_main(["data", "lists", "kinetics", str(train), "--root", str(kroot), "--out", str(kout)]) == 0
    before = (kout / "kinetics_3_labels.csv").stat().st_mtime_ns
    capsys.readouterr()
    assert cli_main(["data", "lists", "kinetics", str(val), "--root", str(kroot), "--out", str(kout),
                     "--classes", str(kout / "kinetics_3_labels.csv")]) == 0
    printed = capsys.readouterr().out
    assert "  val.txt                1 video\n" in printed and "3 classes (the --classes file, kept)" in printed
    assert (kout / "kinetics_3_labels.csv").stat().st_mtime_ns == before
    assert lines(kout / "val.txt") == ["val/abseiling/val001_000100_000110.webm 0"]


def test_printed_k400_eval_entry_pasted_into_the_recipe_keeps_its_4x3_views_and_summary(tmp_path, capsys):
    """The documented workflow: the printed eval.datasets entry replaces mote_vitb16.yaml's own (same name, k400), so
    the recipe's eval.summary still names it and the close-set protocol stays 4 clips x 3 crops."""
    from mergekit_video.cli.commands import _load_validated

    root = tmp_path / "k400"
    rows = [K400_HEADER]
    for i in range(400):  # one video per class: 400 classes make the official name k400
        (root / f"v{i:03d}_000000_000010.mp4").parent.mkdir(parents=True, exist_ok=True)
        (root / f"v{i:03d}_000000_000010.mp4").write_bytes(b"x")
        rows.append(f"class {i:03d},v{i:03d},0,10,validate")
    val = tmp_path / "validate.csv"  # the official name; without a split column its list is val.txt all the same
    val.write_text("\n".join(r.rsplit(",", 1)[0] for r in rows) + "\n")
    out = tmp_path / "lists"
    assert cli_main(["data", "lists", "kinetics", str(val), "--root", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "# keep these names or update it (MoTE's close-set views: 4 clips x 3 crops)\n" in printed
    entries = yaml.safe_load(printed.split("\n\n", 1)[1])["eval"]["datasets"]
    assert entries == [{"name": "k400", "kind": "close_set", "root": str(root), "class_csv": str(out / "kinetics_400_labels.csv"),
                        "list": str(out / "val.txt"), "num_clips": 4, "num_crops": 3}]
    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "mote_vitb16.yaml").read_text())
    recipe["eval"]["datasets"] = [entries[0] if d["name"] == entries[0]["name"] else d for d in recipe["eval"]["datasets"]]
    pasted = tmp_path / "mine.yaml"
    pasted.write_text(yaml.safe_dump(recipe, sort_keys=False))
    cfg = _load_validated(pasted, [])
    assert cfg["eval"]["summary"] == {"close_set": "k400", "zero_shot": []}
    assert [(d["name"], d["num_clips"], d["num_crops"]) for d in cfg["eval"]["datasets"]] == [("k400", 4, 3)]


def test_eval_dataset_names_follow_the_shipped_recipes():
    from mergekit_video.data.official_lists import eval_dataset_name

    assert [eval_dataset_name("kinetics", n, c) for n, c in (("val.txt", 400), ("test.txt", 400), ("val.txt", 600), ("val.txt", 3))] == [
        "k400", "k400_test", "k600", "kinetics_val"]
    assert [eval_dataset_name(f, n, 2) for f, n in (("ucf101", "testlist01.txt"), ("hmdb51", "vallist_split1.txt"),
                                                    ("ssv2", "val.txt"), ("ssv2", "extra.txt"))] == ["ucf101", "hmdb51", "ssv2", "ssv2_extra"]
