from django.db import migrations, models
import django.db.models.deletion


class Migration(migrations.Migration):

    dependencies = [
        ("shop", "0001_initial"),
    ]

    operations = [
        migrations.CreateModel(
            name="Comment",
            fields=[
                ("id", models.AutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("body", models.CharField(max_length=200)),
                ("article", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="comments",
                                              to="shop.article")),
            ],
        ),
    ]
